"""Session fixtures for the real Slurm dev clusters.

`slurm_cluster`: Slurm 22.05 started by `tools/slurm-dev-cluster up` (its clients are on PATH).
`slurm24_cluster`: Slurm 24.11 with topology/block started by `tools/slurm24-dev-cluster up` (its
clients are wrappers in the cluster's bin dir; `.run` calls them by absolute path, so both clusters
can be used in one session).

If a cluster is not up, tests that use its fixture are skipped, unless MILES_REQUIRE_SLURM=1 (CI sets
it), in which case they fail: Slurm tests must never skip silently in CI.
"""

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TOOL = REPO / "tools" / "slurm-dev-cluster"
TOOL24 = REPO / "tools" / "slurm24-dev-cluster"


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


def _skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it under MILES_REQUIRE_SLURM=1."""
    if os.environ.get("MILES_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason}. MILES_REQUIRE_SLURM=1 forbids skipping Slurm tests.", pytrace=False)
    pytest.skip(reason)


def _status(tool: Path) -> subprocess.CompletedProcess:
    """`<tool> status`; skips (or fails) when the cluster is not up."""
    try:
        status = subprocess.run([str(tool), "status"], capture_output=True, text=True, timeout=60)
        rc, out = status.returncode, (status.stdout + status.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        rc, out = -1, repr(e)
    if rc != 0:
        _skip_or_fail(
            f"Slurm dev cluster is not up (`tools/{tool.name} status` exited {rc}: "
            f"{out.splitlines()[0] if out else 'no output'}); start it with `tools/{tool.name} up`"
        )
    return status


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The 22.05 dev cluster; skips (or fails under MILES_REQUIRE_SLURM=1) when it is not up."""
    status = _status(TOOL)
    cluster = _cluster_from_status(status.stdout)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf))
        yield cluster


@dataclass(frozen=True)
class Slurm24Cluster:
    """The running Slurm 24.11 block-topology cluster, as `tools/slurm24-dev-cluster status` reports it."""

    bin_dir: Path
    """Host-side wrappers of the 24.11 clients (sbatch, srun, scontrol, ...)."""
    nodes: tuple[str, ...]
    """Virtual node names, in node order (n0, n1, ...)."""
    blocks: dict[str, str]
    """Base block name of each node (n0 -> b1), from `scontrol show topology`."""
    gpus_per_node: int
    """Fake GPUs (gres/gpu) per node."""
    imex: bool
    """switch/nvidia_imex is on (fake channels in each step's /dev/nvidia-caps-imex-channels)."""

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a 24.11 client (args[0] is its name: sbatch, srun, ...) through its wrapper; capture text output."""
        argv = [str(self.bin_dir / args[0]), *args[1:]]
        env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}  # the 22.05 fixture may have set it
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc


def _expand_nodes(expr: str) -> list[str]:
    """Slurm hostlist `n[0-1,4]` / `n3` -> node names (the one-bracket forms our clusters use)."""
    m = re.fullmatch(r"(\w+?)\[([\d,-]+)\]", expr)
    if not m:
        return [expr]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _cluster24_from_status(status_out: str) -> Slurm24Cluster:
    head = re.search(r"up \((nodes=.*?)\)", status_out)
    path = re.search(r"^export PATH=(\S+?):\$PATH$", status_out, re.M)
    assert head and path, f"unexpected `tools/slurm24-dev-cluster status` output:\n{status_out}"
    shape = dict(kv.split("=", 1) for kv in head.group(1).split())
    blocks = {}
    for name, nodes in re.findall(r"^BlockName=(\S+) .*?Nodes=(\S+)", status_out, re.M):
        blocks.update({node: name for node in _expand_nodes(nodes)})
    nodes = tuple(sorted(blocks, key=lambda n: int(n[1:])))
    assert len(nodes) == int(shape["nodes"]), f"topology does not name every node:\n{status_out}"
    return Slurm24Cluster(bin_dir=Path(path.group(1)), nodes=nodes, blocks=blocks,
                          gpus_per_node=int(shape["gpus"]), imex=shape["imex"] == "1")


@pytest.fixture(scope="session")
def slurm24_cluster() -> Slurm24Cluster:
    """The 24.11 block-topology dev cluster; skips (or fails under MILES_REQUIRE_SLURM=1) when it is not up."""
    return _cluster24_from_status(_status(TOOL24).stdout)


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory) -> Path:
    """A folder with prompts.jsonl ("repeat" task) and sft.jsonl ("repeat-sft"), 64 rows each, for CI-sized runs
    of the quickstart recipe (rollout.data_path / sft.data_path)."""
    data_dir = tmp_path_factory.mktemp("data")
    for name, task, seed in (("prompts.jsonl", "repeat", "0"), ("sft.jsonl", "repeat-sft", "1")):
        subprocess.run([sys.executable, "-m", "miles.rollout.synthetic", str(data_dir / name), "--task", task,
                        "--num", "64", "--seed", seed], check=True, capture_output=True)
    return data_dir


def job_state24(cluster: Slurm24Cluster, job_id: str) -> str:
    """State of a job on the 24.11 cluster (RUNNING, PENDING, ...), "GONE" once squeue no longer lists it."""
    out = cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.split()
    return out[0] if out else "GONE"


@pytest.fixture
def hold_nodes24(slurm24_cluster, tmp_path) -> Iterator[Callable[..., dict[str, str]]]:
    """`hold_nodes24("n2", "n6")`: hold each node of the 24.11 cluster with an exclusive `sleep 120` job and return
    once all of them run ({node: job id}); the jobs still alive are cancelled when the test ends."""
    cluster, jobs = slurm24_cluster, {}

    def hold(*nodes: str, timeout_s: float = 30) -> dict[str, str]:
        held = {node: cluster.run("sbatch", "--parsable", "--exclusive", "-t1", "-w", node,
                                  "-o", str(tmp_path / f"hold-{node}.out"), "--wrap", "sleep 120").stdout.strip()
                for node in nodes}
        jobs.update(held)
        deadline = time.monotonic() + timeout_s
        while not all(job_state24(cluster, j) == "RUNNING" for j in held.values()):
            assert time.monotonic() < deadline, f"blocker jobs {held} not all RUNNING after {timeout_s:.0f} s"
            time.sleep(0.2)
        return held

    yield hold
    live = [j for j in jobs.values() if job_state24(cluster, j) not in ("GONE", "COMPLETING")]
    if live:  # scancel of a COMPLETING job retries for ~5 s
        cluster.run("scancel", *live, check=False)
