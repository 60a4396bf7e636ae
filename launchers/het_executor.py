"""submitit carries our het job: `HetJobExecutor` is a `submitit.SlurmExecutor` whose batch file is the
rendered sbatch/miles-het.sbatch.

    ex = HetJobExecutor(folder="runs/quickstart/submitit", script=render_het_script(...))
    job = ex.submit(het_job_result)      # a submitit.slurm.SlurmJob: job.job_id, job.stdout(), job.cancel()
    job.result()                         # HetJobResult, or raises with the "het-group G (...) rank R" message

Why a subclass and not submitit as is (docs/slurm.md): submitit writes one set of #SBATCH lines and
one `srun` of its own runner; a het job needs `#SBATCH hetjob` separators (its parameters become
`--key=value`, so they cannot express one) and three steps of different shapes. So we replace only
the batch file. Everything else is submitit's: sbatch call and error reporting, job ids, log
paths, state queries, cancel. At its end the batch script runs submitit's runner once
(`python -m submitit.core._submit FOLDER`) with the job's outcome in the environment, and the
pickled `het_job_result` turns it into the job's result, so `job.result()` works even without
sacct (the dev cluster has none).
"""

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import submitit

from miles.errors import ConfigError

TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE")


class HetJobExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor whose sbatch file is a pre-rendered Miles het-job script."""

    def __init__(self, folder: str | os.PathLike, script: str):
        super().__init__(folder)
        self._script = script

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        # submitit's own `srun ... submitit.core._submit FOLDER` is run by the script itself, at the end.
        return self._script

    def _num_tasks(self) -> int:
        return 1  # one result: the batch script's outcome


@dataclass(frozen=True)
class HetJobResult:
    """What job.result() returns for a het job that finished training."""

    message: str
    """The batch script's closing message."""
    run_dir: str
    """The run directory (metrics, logs, checkpoints)."""
    last_metrics: dict
    """The controller's last metrics row, if any."""


class HetJobFailed(RuntimeError):
    """The het job ended non-zero; the message names the group and rank that failed."""


def het_job_result() -> HetJobResult:
    """Run by submitit's runner at the end of the batch script: the job's outcome as a result or an error."""
    status = int(os.environ.get("MILES_JOB_STATUS", "1"))
    message = os.environ.get("MILES_JOB_MESSAGE", "no outcome reported by the batch script")
    run_dir = os.environ.get("MILES_RUN_DIR", "")
    if status != 0:
        raise HetJobFailed(f"het job failed (exit {status}): {message}")
    metrics_path = Path(run_dir, "metrics.jsonl")
    rows = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    return HetJobResult(message=message, run_dir=run_dir, last_metrics=json.loads(rows[-1]) if rows else {})


def job_state(job_id: str) -> str | None:
    """The het job's state from `scontrol show job` (its first component), None once Slurm forgot it.

    scontrol, not sacct: clusters without accounting (the dev cluster) have no sacct.
    """
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    match = re.search(r"\bJobState=(\S+)", proc.stdout)
    return match.group(1) if proc.returncode == 0 and match else None


def _gres_gpus(gres: str) -> int:
    """GPU count of one node's sinfo %G value ("gpu:4", "gpu:h100:8(S:0-1)", "(null)")."""
    best = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            best = max(best, int(parts[-1]))
    return best


def partition_gpus_per_node(partition: str) -> tuple[str, int]:
    """(partition name, most GPUs on one of its nodes) from sinfo; "" = the default partition."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P %G"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ConfigError(f"sinfo failed (exit {out.returncode}): {out.stderr.strip()}")
    per_partition: dict[str, int] = {}
    default = ""
    for line in out.stdout.splitlines():
        if not line.strip():
            continue
        name, gres = line.split(maxsplit=1) if " " in line.strip() else (line.strip(), "")
        if name.endswith("*"):
            name = default = name[:-1]
        per_partition[name] = max(per_partition.get(name, 0), _gres_gpus(gres))
    name = partition or default
    if name not in per_partition:
        raise ConfigError(f"partition {name!r} does not exist; partitions: {', '.join(sorted(per_partition))}")
    return name, per_partition[name]


def check_partition(cfg) -> None:
    """ConfigError when cluster.partition does not exist, or cluster.gpus_per_node exceeds its nodes' GPUs."""
    c = cfg.cluster
    if not (c.partition or c.gpus_per_node):
        return
    name, have = partition_gpus_per_node(c.partition)
    if c.gpus_per_node > have:
        raise ConfigError(f"cluster.gpus_per_node={c.gpus_per_node}, but the nodes of partition {name!r} have at "
                          f"most {have} GPU(s) (sinfo -p {name} -o %G)")
