"""Trainer bootstrap under srun on two virtual nodes: torch.distributed through env:// and through mpi4py."""

import re
import sys

import pytest

pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("bootstrap,srun_mpi", [("env", "none"), ("mpi", "pmi2")])
def test_two_rank_all_reduce(slurm_cluster, bootstrap, srun_mpi):
    nodes = list(slurm_cluster.nodes[:2])
    out = slurm_cluster.run(
        "srun", f"--mpi={srun_mpi}", "-N2", "-n2", "-t1", f"--nodelist={','.join(nodes)}",
        sys.executable, "-m", "miles.launchers.role", "dist-check", "--bootstrap", bootstrap, timeout=120,
    ).stdout
    rows = sorted(re.findall(r"dist-check rank=(\d) world_size=(\d) local_rank=\d master=(\S+) bootstrap=(\w+) "
                             r"all_reduce=(\S+) expected=(\S+)", out))
    assert [r[0] for r in rows] == ["0", "1"], out
    assert all(r[1] == "2" and r[3] == bootstrap and r[4] == r[5] == "3" for r in rows), out
    assert rows[0][2] == rows[1][2]  # one master address:port for both ranks (rank 0's node, the job's port)
