"""Weight sync through a shared filesystem: write HF-named safetensors, ask engines to load them.

    out = save_hf_weights(named_tensors, "/shared/run/weights/step-12")
    update_engines_from_disk(engine_urls, str(out), weight_version="step-12")

Works with real SGLang and the embedded engine (`/update_weights_from_disk`). Slower than the
distributed transport, but needs no process group and survives engine restarts.
"""

import asyncio
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from miles.engines.client import EngineClient

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 4 << 30


def save_hf_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write tensors (HF names) as safetensors shards in out_dir; return out_dir.

    One `model.safetensors` when everything fits in max_shard_bytes, else
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` (HF layout). Each file is
    written under a temporary name and renamed, so a reader never sees half a file. Tensors are
    copied to contiguous CPU memory (shared storage, e.g. tied embeddings, is fine).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu").contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        if name in shards[-1] or any(name in s for s in shards[:-1]):
            raise ValueError(f"tensor name {name!r} given twice")
        shards[-1][name] = t
        size += nbytes
    if not shards[0]:
        raise ValueError("no tensors to save")
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, shard in zip(files, shards):
        tmp = out / f".{fname}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                 "weight_map": {name: f for f, s in zip(files, shards) for name in s}}
        tmp = out / ".model.safetensors.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, out / "model.safetensors.index.json")
    logger.info("saved %d tensors in %d file(s) to %s", sum(len(s) for s in shards), n, out)
    return out


async def update_engines_from_disk_async(engine_urls: list[str], model_path: str, weight_version: str | None) -> None:
    """POST /update_weights_from_disk to every engine concurrently; raise EngineError if any fails."""

    async def one(url: str) -> None:
        async with EngineClient(url) as client:
            await client.update_weights_from_disk(str(model_path), weight_version)

    results = await asyncio.gather(*(one(u) for u in engine_urls), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    logger.info("%d engine(s) loaded %s (weight_version %s)", len(engine_urls), model_path, weight_version)


def update_engines_from_disk(engine_urls: list[str], model_path: str, weight_version: str | None) -> None:
    """Sync wrapper of `update_engines_from_disk_async` (not for use inside a running event loop)."""
    asyncio.run(update_engines_from_disk_async(engine_urls, model_path, weight_version))
