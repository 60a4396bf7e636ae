"""The few collectives checkpointing needs, over the default process group (one process without it)."""

from typing import Any

import torch.distributed as dist


def _on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without torch.distributed)."""
    return dist.get_rank() if _on() else 0


def world_size() -> int:
    """Number of ranks (1 without torch.distributed)."""
    return dist.get_world_size() if _on() else 1


def barrier() -> None:
    """Wait for every rank."""
    if _on():
        dist.barrier()


def broadcast_from_0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable)."""
    if not _on() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _on() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
