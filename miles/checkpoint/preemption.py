"""Stop requests: preemption, time limits and SIGUSR1/SIGTERM turned into "save at the next step
boundary, then exit with EXIT_PREEMPTED" (docs/preemption.md).

    stop = StopRequest(run_dir)
    stop.install_signal_handlers()          # local executor (miles.driver.main) only
    for step in ...:
        if stop.requested():                # collective: every rank gets rank 0's answer
            save ...; raise Preempted(step)

Two sources, either is enough:
  * the stop file <run_dir>/PREEMPT, created by the Slurm batch script when Slurm sends it the
    `--signal=B:<SIG>@<grace>` signal (or by an operator who wants a clean stop);
  * a signal delivered to this process (SIGUSR1/SIGTERM), whose handler only sets a flag.

The driver finishes the step in flight (rollout, train, weight sync, save if due) and checks at
the step boundary, so a checkpoint always holds whole steps and never a half-applied one.

Test hook: MILES_TEST_PAUSE_AT="<phase>:<step>[,...]" (phase: rollout, train, sync, save) makes
rank 0 create <run_dir>/test-pause/<phase>-<step> when it enters that phase of that RL step, then
wait (at most MILES_TEST_PAUSE_S seconds, default 60) until a stop is requested, so a test can
signal a run while it is in that phase. Each point pauses once per run directory.
"""

import json
import logging
import os
import signal
import time
from pathlib import Path

from miles.checkpoint import ranks

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status of a trainer that stopped on request after saving (EX_TEMPFAIL: run it again)."""
STOP_FILE = "PREEMPT"
"""Name of the stop file inside the run directory."""
PAUSE_ENV = "MILES_TEST_PAUSE_AT"
PAUSE_SECONDS_ENV = "MILES_TEST_PAUSE_S"


class Preempted(Exception):
    """Raised by miles.driver.train after the stop-request checkpoint is committed."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped on request ({reason}) after RL step {step}; the checkpoint holds {step} step(s)")
        self.step = step
        self.reason = reason


class StopRequest:
    """Whether this run was asked to stop: the stop file exists or a handled signal arrived."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / STOP_FILE
        self._signal: str | None = None

    def install_signal_handlers(self, signums=(signal.SIGUSR1, signal.SIGTERM)) -> None:
        """Handle `signums` by setting a flag (nothing else happens in the handler). A second
        SIGTERM kills the process the default way. Call from the main thread."""
        def handler(signum, frame):
            self._signal = signal.Signals(signum).name
            if signum == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

        for signum in signums:
            signal.signal(signum, handler)

    def seen_locally(self) -> str | None:
        """Non-collective: the reason this process sees a stop request ("SIGUSR1", "stop file"), or None."""
        if self._signal:
            return self._signal
        return "stop file" if self.path.exists() else None

    def requested(self) -> str | None:
        """Collective: rank 0's seen_locally(), on every rank."""
        reason = ranks.broadcast_from_0(self.seen_locally() if ranks.rank() == 0 else None)
        if reason:
            logger.info("stop requested (%s): saving at this step boundary, then exiting with %d",
                        reason, EXIT_PREEMPTED)
        return reason

    def clear(self) -> None:
        """Collective: remove the stop file (after the checkpoint is committed)."""
        if ranks.rank() == 0:
            self.path.unlink(missing_ok=True)
        ranks.barrier()


def pause_for_test(phase: str, step: int, run_dir: str | Path, stop: StopRequest) -> None:
    """The MILES_TEST_PAUSE_AT hook (see the module docstring); a no-op unless the variable names
    this phase and step. Rank 0 only: the other ranks wait at the next collective."""
    points = os.environ.get(PAUSE_ENV, "")
    if not points or f"{phase}:{step}" not in points.split(",") or ranks.rank() != 0:
        return
    marker = Path(run_dir) / "test-pause" / f"{phase}-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()}\n")
    limit = time.monotonic() + float(os.environ.get(PAUSE_SECONDS_ENV, "60"))
    logger.info("test pause at %s of step %d: waiting for a stop request", phase, step)
    while stop.seen_locally() is None and time.monotonic() < limit:
        time.sleep(0.1)


class TrainedSampleLog:
    """<run_dir>/trained_samples.jsonl: one line per RL step, {"step": s, "samples": [sample ids]}.

    Written by the controller after the step's update. On resume the lines of steps at or after
    the resumed step are dropped (they were trained after the last checkpoint, then lost by a
    hard stop, and are trained again), so the file lists exactly the samples of the model's history.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "trained_samples.jsonl"

    def rewind(self, start_step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line)["step"] < start_step]
        if len(keep) != len(lines):
            logger.warning("trained_samples.jsonl: dropped %d line(s) of steps >= %d (trained after the last "
                           "checkpoint, redone now)", len(lines) - len(keep), start_step)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, self.path)

    def append(self, step: int, sample_ids: list[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "samples": sample_ids}) + "\n")
