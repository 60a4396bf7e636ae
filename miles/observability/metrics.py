"""Metric sinks: TensorBoard scalars plus a JSONL file, or nothing.

    metrics = MetricsLogger(run_dir) if rank == 0 else NullMetricsLogger()
    metrics.log(step, {"rollout/reward_mean": 0.4, "train/loss": 0.1})

Keys are "<subsystem>/<name>". The null logger lets loops log unconditionally (no branching on
whether this rank writes).
"""

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


class NullMetricsLogger:
    """Accepts metrics and drops them (non-zero ranks, logging off)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger:
    """Writes every metric to TensorBoard (run_dir/tensorboard) and to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for key, value in clean.items():
            self._writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        self._jsonl.close()
