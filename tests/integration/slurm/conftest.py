"""The `slurm_cluster` session fixture: the real Slurm dev cluster started by `tools/slurm-dev-cluster up`.

If the cluster is not up, tests that use the fixture are skipped, unless MILES_REQUIRE_SLURM=1 (CI sets
it), in which case they fail: Slurm tests must never skip silently in CI.
"""

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TOOL = REPO / "tools" / "slurm-dev-cluster"


@dataclass(frozen=True)
class SlurmCluster:
    """The running dev cluster, as `tools/slurm-dev-cluster status` and `sinfo` report it."""

    conf: Path
    """slurm.conf of the cluster (exported as SLURM_CONF for the whole test session)."""
    nodes: tuple[str, ...]
    """Virtual node names in the default partition, sorted (n0, n1, ...)."""
    gpus_per_node: int
    """Fake GPUs (gres/gpu) per node; 0 when the cluster has none."""

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (srun, sbatch, scontrol, ...) and capture its text output."""
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc


def _cluster_from_status(status_out: str) -> SlurmCluster:
    conf = next(
        (line.split("=", 1)[1] for line in status_out.splitlines() if line.startswith("export SLURM_CONF=")), None
    )
    assert conf, f"no 'export SLURM_CONF=' line in status output:\n{status_out}"
    sinfo = subprocess.run(
        ["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %G"],
        capture_output=True, text=True, timeout=30, check=True, env={**os.environ, "SLURM_CONF": conf},
    )
    nodes, gpus = [], set()
    for line in sinfo.stdout.split("\n"):
        if line.strip():
            name, gres = line.split()
            nodes.append(name)
            gpus.add(int(gres.split(":")[-1]) if gres.startswith("gpu:") else 0)
    assert len(gpus) == 1, f"nodes disagree on their GPU count: {sinfo.stdout}"
    return SlurmCluster(conf=Path(conf), nodes=tuple(sorted(nodes)), gpus_per_node=gpus.pop())


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The dev cluster; skips (or fails under MILES_REQUIRE_SLURM=1) when it is not up."""
    try:
        status = subprocess.run([str(TOOL), "status"], capture_output=True, text=True, timeout=60)
        rc, out = status.returncode, (status.stdout + status.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        rc, out = -1, repr(e)
    if rc != 0:
        reason = (
            f"Slurm dev cluster is not up (`tools/slurm-dev-cluster status` exited {rc}: "
            f"{out.splitlines()[0] if out else 'no output'}); start it with `tools/slurm-dev-cluster up`"
        )
        if os.environ.get("MILES_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason}. MILES_REQUIRE_SLURM=1 forbids skipping Slurm tests.", pytrace=False)
        pytest.skip(reason)
    cluster = _cluster_from_status(status.stdout)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf))
        yield cluster
