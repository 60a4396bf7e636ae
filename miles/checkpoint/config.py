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

    preempt_signal: str = "USR1"
    """Signal Slurm sends the batch shell `preempt_grace_s` before the time limit and on preemption
    (#SBATCH --signal=B:<SIG>@<grace>): USR1 or USR2. The batch script turns it into a stop request."""
    preempt_grace_s: int = 120
    """Seconds between that signal and the kill. Must cover finishing the current RL step plus one save."""
    requeue_on_preemption: bool = True
    """After a preemption signal (or `scancel --signal=<SIG> --batch`): save, then `scontrol requeue`."""
    max_timeout_requeues: int = 3
    """After the time-limit signal: save, then requeue, at most this many times per job (0 = a time
    limit ends the job after the save). docs/preemption.md says how a timeout is told from a preemption."""

    def __post_init__(self) -> None:
        if self.preempt_signal not in ("USR1", "USR2"):
            raise ConfigError(f"checkpoint.preempt_signal must be USR1 or USR2 (Slurm uses TERM to kill), "
                              f"got {self.preempt_signal!r}")
        if self.preempt_grace_s < 1:
            raise ConfigError(f"checkpoint.preempt_grace_s must be >= 1, got {self.preempt_grace_s}")
        if self.max_timeout_requeues < 0:
            raise ConfigError(f"checkpoint.max_timeout_requeues must be >= 0, got {self.max_timeout_requeues}")
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
