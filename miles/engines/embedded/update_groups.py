"""The engine side of `/init_weights_update_group` and `/update_weights_from_distributed`.

The trainer is rank 0 of a named group; this engine joins as `rank_offset` (one rank: the embedded
engine has no tensor parallelism). Tensors arrive by `broadcast(src=0)` in the order of `names`:
one broadcast per tensor, or with load_format="flattened_bucket" one broadcast of all tensors
flattened and concatenated (SGLang's FlattenedTensorBucket layout: `torch.cat` of the flattened
tensors, so the buffer has their common promoted dtype; each piece is cast back to its dtype).
"""

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from miles.weight_sync.process_group import destroy_custom_process_group, init_custom_process_group

logger = logging.getLogger(__name__)

LOAD_FORMATS = (None, "flattened_bucket")


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' or 'torch.bfloat16' → torch.bfloat16; ValueError otherwise."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class UpdateGroups:
    """Named process groups joined by this engine."""

    def __init__(self) -> None:
        self._groups: dict[str, dist.ProcessGroup] = {}

    def init(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
             group_name: str, backend: str, timeout_s: float = 1800.0) -> None:
        """Join group_name as rank rank_offset; blocks until all world_size ranks joined."""
        if group_name in self._groups:
            raise ValueError(f"weight update group {group_name!r} already exists; destroy it first")
        self._groups[group_name] = init_custom_process_group(
            backend=backend, init_method=f"tcp://{master_address}:{int(master_port)}", world_size=int(world_size),
            rank=int(rank_offset), group_name=group_name, timeout=timedelta(seconds=timeout_s),
        )

    def destroy(self, group_name: str) -> None:
        pg = self._groups.pop(group_name, None)
        if pg is None:
            raise ValueError(f"no weight update group named {group_name!r}")
        destroy_custom_process_group(pg)
        logger.info("destroyed weight update group %r", group_name)

    def receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                load_format: str | None) -> list[tuple[str, torch.Tensor]]:
        """Receive one bucket from rank 0, in the order of names."""
        pg = self._groups.get(group_name)
        if pg is None:
            raise ValueError(f"no weight update group named {group_name!r}; call /init_weights_update_group first")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {load_format!r} is not one of {LOAD_FORMATS}")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
        tensors = [torch.empty([int(s) for s in shape], dtype=parse_dtype(dt)) for dt, shape in zip(dtypes, shapes)]
        if load_format == "flattened_bucket" and tensors:
            flat = torch.cat([t.flatten() for t in tensors])
            dist.broadcast(flat, src=0, group=pg)
            start = 0
            for i, t in enumerate(tensors):
                tensors[i] = flat[start:start + t.numel()].reshape(t.shape).to(t.dtype)
                start += t.numel()
        else:
            for t in tensors:
                dist.broadcast(t, src=0, group=pg)
        return list(zip(names, tensors))
