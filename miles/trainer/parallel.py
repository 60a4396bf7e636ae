"""torch.distributed + megatron-core model-parallel setup and teardown for trainer ranks.

The launcher (Slurm step or local executor) gives every rank the env:// contract:
MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and optionally LOCAL_RANK (default 0). On GPU the
backend is NCCL and the rank binds to cuda:LOCAL_RANK; on CPU it is gloo, and
`miles.trainer.cpu_compat.apply_cpu_compat()` must have been called first (the RNG tracker
seeding below needs shim S7).
"""

import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from miles.errors import ConfigError

logger = logging.getLogger(__name__)

_REQUIRED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
_owns_process_group = False


@dataclass(frozen=True)
class ParallelState:
    """Where this rank sits in the torch.distributed world and the megatron groups."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of trainer ranks."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    tp_size: int
    """Tensor-parallel size."""
    tp_rank: int
    """Rank inside the tensor-parallel group."""
    pp_size: int
    """Pipeline-parallel size."""
    pp_rank: int
    """Rank inside the pipeline-parallel group."""
    dp_size: int
    """Data-parallel size (world_size / (tp_size * pp_size))."""
    dp_rank: int
    """Rank inside the data-parallel group."""
    backend: str
    """torch.distributed backend: "nccl" or "gloo"."""
    device: torch.device
    """Device this rank computes on."""
    ep_size: int = 1
    """Expert-parallel size (1 for dense models)."""
    ep_rank: int = 0
    """Rank inside the expert-parallel group."""


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from e


def _init_process_group(env: Mapping[str, str], timeout_s: float) -> tuple[str, torch.device, int]:
    """Create the default process group from env:// (or adopt an existing one)."""
    global _owns_process_group
    local_rank = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_backend(), device, local_rank
    missing = [name for name in _REQUIRED_ENV if name not in env]
    if missing:
        raise ConfigError(f"trainer rank environment lacks {', '.join(missing)}; the launcher must set "
                          f"{', '.join(_REQUIRED_ENV)} (env:// rendezvous)")
    backend = "nccl" if use_cuda else "gloo"
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # env:// reads these from os.environ
        os.environ[name] = env[name]
    dist.init_process_group(
        backend=backend, init_method="env://", rank=_env_int(env, "RANK"),
        world_size=_env_int(env, "WORLD_SIZE"), timeout=timedelta(seconds=timeout_s),
        device_id=device if use_cuda else None,
    )
    _owns_process_group = True
    return backend, device, local_rank


def init_parallel(
    tp_size: int = 1,
    pp_size: int = 1,
    seed: int = 1234,
    timeout_s: float = 1800.0,
    env: Mapping[str, str] | None = None,
    ep_size: int = 1,
) -> ParallelState:
    """Join the process group (env://), build megatron's TP/PP/DP groups and seed all RNGs.

    If torch.distributed is already initialized it is reused (and left alone by teardown).
    Seeds: python/numpy/torch get `seed + 100 * pp_rank`; megatron's RNG tracker derives the
    per-TP-rank streams from it, as Megatron-LM does.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from miles.trainer import cpu_compat

    if not torch.cuda.is_available() and not cpu_compat.is_applied():
        raise RuntimeError("no CUDA: call miles.trainer.cpu_compat.apply_cpu_compat() before init_parallel()")
    backend, device, local_rank = _init_process_group(os.environ if env is None else env, timeout_s)
    world_size = dist.get_world_size()
    if tp_size < 1 or pp_size < 1 or world_size % (tp_size * pp_size):
        raise ConfigError(f"world size {world_size} is not divisible by tp_size {tp_size} x pp_size {pp_size}")
    if ep_size < 1 or world_size % (tp_size * pp_size * ep_size):
        raise ConfigError(f"world size {world_size} is not divisible by tp_size {tp_size} x pp_size {pp_size} x "
                          f"ep_size {ep_size} (EP is carved out of the data-parallel ranks)")
    if mpu.model_parallel_is_initialized():
        raise RuntimeError("megatron model parallel state is already initialized; call teardown_parallel() first")
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        expert_model_parallel_size=ep_size,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    state = ParallelState(
        rank=dist.get_rank(), world_size=world_size, local_rank=local_rank,
        tp_size=tp_size, tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_size=pp_size, pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(), dp_rank=mpu.get_data_parallel_rank(),
        ep_size=ep_size, ep_rank=mpu.get_expert_model_parallel_rank(),
        backend=backend, device=device,
    )
    rank_seed = seed + 100 * state.pp_rank
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(rank_seed, force_reset_rng=True)
    logger.info("parallel state: %s", state)
    return state


def teardown_parallel() -> None:
    """Destroy megatron's groups, and the default process group if `init_parallel` created it."""
    global _owns_process_group
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
