"""Per-rank random-number-generator state: capture, file round trip, restore.

Covers python's `random`, numpy's global generator, torch's CPU generator, the current CUDA
device's generator (when CUDA is available) and megatron's RNG tracker streams (the per-TP-rank
"model-parallel-rng" and friends used by dropout and recompute; on CPU they are CPU generator
states, see cpu_compat S7). Files hold only tensors, ints, floats, strings and tuples, so they
load with `torch.load(weights_only=True)`.
"""

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """This process's RNG states, copied."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _tracker()
    if tracker is not None and tracker.is_initialized():
        state["megatron_tracker"] = {name: s.clone() for name, s in tracker.get_states().items()}
    return state


def restore(state: dict[str, Any], with_tracker: bool = True) -> None:
    """Set this process's RNG states from `capture()`'s output (megatron's tracker only if `with_tracker`)."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if with_tracker and "megatron_tracker" in state:
        tracker = _tracker()
        if tracker is not None:
            tracker.set_states({name: s.clone() for name, s in state["megatron_tracker"].items()})


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (from `capture()`) to `path`."""
    torch.save(state, path)


def load(path: Path) -> dict[str, Any]:
    """Read a state written by `save`."""
    return torch.load(path, weights_only=True)


def _tracker():
    """megatron's RNG tracker, or None when megatron-core is not importable."""
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
    except ImportError:
        return None
    return get_cuda_rng_tracker()
