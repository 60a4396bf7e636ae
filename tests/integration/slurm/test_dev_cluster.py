"""Real jobs on the Slurm dev cluster: multi-node steps, het jobs, fake GPUs, signal + requeue, MPI (PMI2).

These pin the Slurm 22.05 behaviour that Miles' launchers rely on (see docs/slurm-dev-cluster.md).
Run: tools/slurm-dev-cluster up && MILES_REQUIRE_SLURM=1 python -m pytest tests/integration/slurm -q
"""

import re
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def _need_nodes(cluster, n: int) -> list[str]:
    if len(cluster.nodes) < n:
        pytest.fail(f"this test needs >= {n} virtual nodes, the dev cluster has {list(cluster.nodes)}")
    return list(cluster.nodes[:n])


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _rows(text: str) -> list[list[str]]:
    return sorted(line.split() for line in text.splitlines() if line.strip())


def _job_fields(cluster, job_id: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def _wait_until(what: str, predicate, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_srun_spans_two_virtual_nodes(slurm_cluster):
    nodes = _need_nodes(slurm_cluster, 2)
    out = slurm_cluster.run(
        "srun", "-N2", "-n2", "-t1", f"--nodelist={','.join(nodes)}",
        "bash", "-c", 'echo "$SLURMD_NODENAME $SLURM_PROCID $SLURM_NNODES"',
    ).stdout
    assert _rows(out) == [[nodes[0], "0", "2"], [nodes[1], "1", "2"]]


HET_SCRIPT = """#!/bin/bash
#SBATCH --job-name=miles-het-test
#SBATCH --output={out}/batch.out
#SBATCH --time=1
#SBATCH --nodes=1 --ntasks=1
#SBATCH hetjob
#SBATCH --nodes=1 --ntasks=2
set -e
env | grep -E '^SLURM_' | sort > {out}/batch.env
show='echo "$SLURM_PROCID $SLURM_NTASKS $SLURMD_NODENAME ${{SLURM_HET_JOB_OFFSET:-unset}}"'
srun --het-group=0 bash -c "$show" > {out}/group0.txt
srun --het-group=1 bash -c "$show" > {out}/group1.txt
srun --het-group=0,1 bash -c "$show" > {out}/both.txt
"""


def test_het_job_one_step_per_component(slurm_cluster, tmp_path):
    _need_nodes(slurm_cluster, 2)
    script = tmp_path / "het.sh"
    script.write_text(HET_SCRIPT.format(out=tmp_path))
    slurm_cluster.run("sbatch", "--wait", str(script), timeout=60)

    env = _env_file(tmp_path / "batch.env")
    node0, node1 = env["SLURM_JOB_NODELIST_HET_GROUP_0"], env["SLURM_JOB_NODELIST_HET_GROUP_1"]
    assert node0 != node1 and {node0, node1} <= set(slurm_cluster.nodes)
    assert env["SLURM_HET_SIZE"] == "2"
    assert (env["SLURM_NTASKS_HET_GROUP_0"], env["SLURM_NTASKS_HET_GROUP_1"]) == ("1", "2")
    assert env["SLURM_JOB_NODELIST"] == node0  # the batch script runs on component 0
    assert env["SLURM_NTASKS"] == "1"
    # Slurm 22.05 sets neither of these; components are told apart by the *_HET_GROUP_<n> variables.
    assert "SLURM_HET_JOB_OFFSET" not in env and "SLURM_HET_JOB_ID" not in env

    # Columns: SLURM_PROCID SLURM_NTASKS SLURMD_NODENAME SLURM_HET_JOB_OFFSET
    assert _rows((tmp_path / "group0.txt").read_text()) == [["0", "1", node0, "unset"]]
    assert _rows((tmp_path / "group1.txt").read_text()) == [["0", "2", node1, "unset"], ["1", "2", node1, "unset"]]
    # One step over both components: global ranks, group 0 first.
    assert _rows((tmp_path / "both.txt").read_text()) == [
        ["0", "3", node0, "unset"], ["1", "3", node1, "unset"], ["2", "3", node1, "unset"],
    ]


def test_fake_gpus_set_cuda_visible_devices(slurm_cluster):
    gpus = slurm_cluster.gpus_per_node
    if gpus < 2:
        pytest.fail(f"this test needs >= 2 fake GPUs per node, the dev cluster has {gpus}")
    out = slurm_cluster.run(
        "srun", "-n1", "-t1", "--gres=gpu:2", "bash", "-c", 'echo "$CUDA_VISIBLE_DEVICES $SLURM_GPUS_ON_NODE"'
    ).stdout.split()
    ids = [int(i) for i in out[0].split(",")]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(0 <= i < gpus for i in ids), out
    assert out[1] == "2"
    # More GPUs than a node has is rejected at once, not queued forever.
    too_many = slurm_cluster.run("srun", "-n1", "-t1", f"--gres=gpu:{gpus + 1}", "true", check=False, timeout=30)
    assert too_many.returncode != 0
    assert "Requested node configuration is not available" in too_many.stderr


SIGNAL_SCRIPT = """#!/bin/bash
#SBATCH --job-name=miles-signal-test
#SBATCH --output={out}/job.out
#SBATCH --open-mode=append
#SBATCH --time=1
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
echo "start restart=${{SLURM_RESTART_COUNT:-0}}"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "rerun done"; exit 0; fi
trap 'echo "usr1 restart=${{SLURM_RESTART_COUNT:-0}}" > {out}/usr1; scontrol requeue "$SLURM_JOB_ID"' USR1
while :; do sleep 1; done
"""


def test_signal_reaches_batch_script_and_requeue_reruns_it(slurm_cluster, tmp_path):
    script = tmp_path / "sig.sh"
    script.write_text(SIGNAL_SCRIPT.format(out=tmp_path))
    job_id = slurm_cluster.run("sbatch", "--parsable", str(script)).stdout.strip()
    assert re.fullmatch(r"\d+", job_id), job_id
    try:
        # slurmctld checks signal times every ~30 s, so USR1 (due at once: 60 s before a 1 min limit) lands within ~30 s.
        usr1 = tmp_path / "usr1"
        _wait_until("USR1 in the batch script", lambda: usr1.exists() and usr1.read_text(), 45)
        assert usr1.read_text().strip() == "usr1 restart=0"

        def finished():
            fields = _job_fields(slurm_cluster, job_id)
            return fields if fields["JobState"] == "COMPLETED" else None

        fields = _wait_until("the requeued job to finish", finished, 45)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    assert fields["Restarts"] == "1"
    assert fields["ExitCode"] == "0:0"
    # The output is appended across runs; slurmstepd adds its own "CANCELLED ... DUE TO JOB REQUEUE" line.
    ours = [line for line in (tmp_path / "job.out").read_text().splitlines() if not line.startswith("slurmstepd")]
    assert ours == ["start restart=0", "start restart=1", "rerun done"]


MPI_SCRIPT = """
import os
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1, op=MPI.SUM)
print(comm.Get_rank(), comm.Get_size(), total, os.environ["SLURMD_NODENAME"], flush=True)
"""


def test_mpi_pmi2_allreduce_across_nodes(slurm_cluster, tmp_path):
    nodes = _need_nodes(slurm_cluster, 2)
    assert "pmi2" in slurm_cluster.run("srun", "--mpi=list").stdout.split()
    script = tmp_path / "allreduce.py"
    script.write_text(MPI_SCRIPT)
    out = slurm_cluster.run(
        "srun", "--mpi=pmi2", "-N2", "-n2", "-t1", f"--nodelist={','.join(nodes)}", sys.executable, str(script),
    ).stdout
    # Both ranks see a world of 2, and the allreduce of (rank + 1) is 1 + 2 = 3 on both.
    assert _rows(out) == [["0", "2", "3", nodes[0]], ["1", "2", "3", nodes[1]]]
