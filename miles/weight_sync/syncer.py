"""`WeightSyncer`: push the trainer's weights (HF names) to every engine, by the configured transport.

Every trainer rank calls `push(actor.export_hf_weights(), version)`, because exporting gathers TP
shards collectively; only the source rank (global rank 0) actually sends, the others just drain
the iterator.
"""

import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from miles.engines.ports import free_port
from miles.weight_sync.config import WeightSyncConfig
from miles.weight_sync.disk import save_hf_weights, update_engines_from_disk
from miles.weight_sync.distributed import DistributedWeightSender

logger = logging.getLogger(__name__)


class WeightSyncer:
    """One transport, set up once per run; `push` once per train step."""

    def __init__(self, cfg: WeightSyncConfig, engine_urls: list[str], is_source: bool, run_dir: Path,
                 master_address: str = "127.0.0.1"):
        self.cfg = cfg
        self.engine_urls = list(engine_urls)
        self.is_source = is_source
        self.weights_dir = Path(run_dir) / "weights"
        self._sender: DistributedWeightSender | None = None
        if is_source and cfg.transport == "distributed":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            port = cfg.master_port or free_port(master_address)
            self._sender = DistributedWeightSender(self.engine_urls, master_address, port, backend=backend)
            self._sender.connect()

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> dict[str, float]:
        """Send all weights; return metrics ("weight_sync/seconds", "weight_sync/mb")."""
        if not self.is_source:
            for _ in named_tensors:  # take part in the collective gathers, send nothing
                pass
            return {}
        if self._sender is not None:
            stats = self._sender.send(named_tensors, version, bucket_bytes=int(self.cfg.bucket_mb * (1 << 20)))
            return {"weight_sync/seconds": stats.seconds, "weight_sync/mb": stats.num_bytes / 1e6}
        start = time.perf_counter()
        out = save_hf_weights(named_tensors, self.weights_dir / version)
        update_engines_from_disk(self.engine_urls, str(out), version)
        self._prune_disk_versions(keep=out)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        return {"weight_sync/seconds": time.perf_counter() - start, "weight_sync/mb": size / 1e6}

    def _prune_disk_versions(self, keep: Path) -> None:
        versions = sorted((p for p in self.weights_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in versions[: -self.cfg.keep_disk_versions]:
            if old != keep:
                shutil.rmtree(old)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
