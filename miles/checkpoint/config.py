"""Configuration of checkpointing: where, how often, how many to keep, forced saves, resume."""

from dataclasses import dataclass
from pathlib import Path

from miles.errors import ConfigError


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where the trainer saves full checkpoints (miles.checkpoint.store), and resume."""

    dir: str = ""
    """Folder holding step_XXXXXXXX/ checkpoints and the `latest` pointer; "" = run_dir/checkpoints.
    Must be on a filesystem every trainer rank sees (each rank writes its own shards)."""
    save_interval: int = 0
    """Save after every save_interval-th RL step (step % save_interval == 0); 0 = only on demand
    (sentinel file, preemption signal)."""
    keep_last: int = 2
    """Complete checkpoints to keep (>= 1); older ones are deleted after each successful save. The
    one `latest` points to is never deleted."""
    sentinel: str = "SAVE_NOW"
    """File whose existence forces a save at the next step boundary; it is deleted once that
    checkpoint is durable. A relative path is taken inside the checkpoint folder; "" = off."""
    resume: bool = True
    """Resume automatically from the newest checkpoint whose checksums verify (fresh start when the
    folder has none); false = always start from model.path (give such a run a fresh checkpoint.dir:
    checkpoints newer than its own are left alone but never resumed from)."""

    def __post_init__(self) -> None:
        if self.save_interval < 0:
            raise ConfigError(f"checkpoint.save_interval must be >= 0 (0 = only on demand), got {self.save_interval}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")

    def resolve_dir(self, run_dir: str | Path) -> Path:
        """The checkpoint folder: `dir`, or run_dir/checkpoints when `dir` is empty."""
        return Path(self.dir) if self.dir else Path(run_dir) / "checkpoints"

    def sentinel_path(self, run_dir: str | Path) -> Path | None:
        """Where the sentinel file is looked for (None when disabled)."""
        if not self.sentinel:
            return None
        path = Path(self.sentinel)
        return path if path.is_absolute() else self.resolve_dir(run_dir) / path

    def is_due(self, step: int) -> bool:
        """Whether the regular interval asks for a save after RL step `step` (1-based count of steps done)."""
        return self.save_interval > 0 and step > 0 and step % self.save_interval == 0
