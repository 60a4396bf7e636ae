"""Slurm 24.11 topology/block on the dev cluster: --segment, planner groups inside blocks, IMEX channels.

Needs `tools/slurm24-dev-cluster up --imex` (8 nodes in base blocks of 2, aggregated blocks of 4 and 8;
`tools/run-tests` starts it). The het job mirrors miles-het.sbatch: het group 0 = rollout, het group 1 =
trainer, whose --segment and rank layout come from miles.cluster.planner. Tasks run the host's
.venv Python inside the chroot, so they compute their TP/EP group ids with the repo's own code.
Run: tools/slurm24-dev-cluster up --imex &&
     MILES_REQUIRE_SLURM=1 python -m pytest tests/integration/slurm/test_block_topology.py -q
"""

import contextlib
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from miles.cluster.planner import plan_placement
from miles.cluster.topology import ClusterShape, EngineLayout, TrainerLayout

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[3]
GPUS_PER_NODE = 2                                   # per-node tasks of the trainer component ("GPUs" it uses)
TRAINER = TrainerLayout(tp=2, ep=4, dp=4)           # 8 ranks on 4 nodes; atom = lcm(2, 4) = 4 ranks = 2 nodes
ENGINE = EngineLayout(tp=2, num_engines=1)          # het group 0: one node
BUSY = ("n0", "n6")                                 # one node of b1 and of b4 taken before the het job


def _wait_until(what: str, predicate, timeout_s: float, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _job_state(cluster, job_id: str) -> tuple[str, str]:
    out = cluster.run("squeue", "-h", "-j", job_id, "-o", "%T %r", check=False).stdout.split()
    return (out[0], out[1]) if len(out) == 2 else ("GONE", "")


@contextlib.contextmanager
def _busy(cluster, nodes, tmp_path: Path):
    """Hold each node with an exclusive sleep job (running before the body starts); cancel them after.

    Yields {node: job id}; pop a job the body cancels itself (scancel of a completing job retries for ~5 s).
    """
    jobs = {}
    try:
        for node in nodes:
            jobs[node] = cluster.run("sbatch", "--parsable", "--exclusive", "-t1", "-w", node,
                                     "-o", str(tmp_path / f"busy-{node}.out"), "--wrap", "sleep 120").stdout.strip()
        for node, job in jobs.items():
            _wait_until(f"blocker job {job} on {node} to run", lambda j=job: _job_state(cluster, j)[0] == "RUNNING", 30)
        yield jobs
    finally:
        if jobs:
            cluster.run("scancel", *jobs.values(), check=False)


def _need(cluster, nodes: int, block: int):
    sizes = defaultdict(int)
    for name in cluster.blocks.values():
        sizes[name] += 1
    if len(cluster.nodes) != nodes or set(sizes.values()) != {block}:
        pytest.fail(f"these tests need {nodes} nodes in base blocks of {block} "
                    f"(`tools/slurm24-dev-cluster up --nodes {nodes} --block-size {block}`), got {dict(sizes)}")


def _block(addr: str) -> str:
    """Block of SLURM_TOPOLOGY_ADDR `<block>.<node>` (SLURM_TOPOLOGY_ADDR_PATTERN=block.node)."""
    return addr.split(".")[0]


def _hostnames(cluster, nodelist: str) -> list[str]:
    return cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()


HET_SCRIPT = """#!/bin/bash
#SBATCH --job-name=miles-block-test
#SBATCH --output={out}/batch.out
#SBATCH --time=1
#SBATCH --nodes={rollout_nodes} --ntasks-per-node=1 {rollout_segment}
#SBATCH hetjob
#SBATCH --nodes={train_nodes} --ntasks-per-node={gpn} --segment={train_segment}
set -e
echo "$SLURM_TOPOLOGY_ADDR_PATTERN" > {out}/pattern
srun --het-group=1 -N{train_nodes} -n{world} {python} -c '{task}' > {out}/trainer.txt
"""

# Each trainer task derives its TP and EP group ids from its rank with the repo's TrainerLayout.
TASK = """
import os
from miles.cluster.topology import TrainerLayout
layout = TrainerLayout(tp={tp}, ep={ep}, dp={dp})
rank = int(os.environ["SLURM_PROCID"])
tp = next(i for i, g in enumerate(layout.tp_groups()) if rank in g)
ep = next(i for i, g in enumerate(layout.ep_groups()) if rank in g)
print(rank, tp, ep, os.environ["SLURM_LOCALID"], os.environ["SLURMD_NODENAME"], os.environ["SLURM_TOPOLOGY_ADDR"])
"""


@pytest.fixture(scope="module")
def het_run(slurm24_cluster, tmp_path_factory):
    """The planned het job, submitted while BUSY nodes are held; its task rows and component node lists."""
    cluster = slurm24_cluster
    _need(cluster, 8, 2)
    shape = ClusterShape(num_nodes=8, gpus_per_node=GPUS_PER_NODE,
                         blocks=tuple(tuple(n for n in cluster.nodes if cluster.blocks[n] == b)
                                      for b in sorted(set(cluster.blocks.values()))))
    placement = plan_placement(shape, TRAINER, ENGINE)
    out = tmp_path_factory.mktemp("block-het")
    script = out / "het.sh"
    script.write_text(HET_SCRIPT.format(
        out=out, rollout_nodes=len(placement.rollout_nodes), train_nodes=len(placement.train_nodes),
        rollout_segment=f"--segment={placement.rollout_segment}" if placement.rollout_segment else "",
        train_segment=placement.train_segment, gpn=GPUS_PER_NODE, world=TRAINER.world_size, python=sys.executable,
        task=TASK.format(tp=TRAINER.tp, ep=TRAINER.ep, dp=TRAINER.dp)))
    with _busy(cluster, BUSY, out):
        job = cluster.run("sbatch", "--parsable", "--wait", str(script), timeout=60).stdout.strip()
    leader = job.split("+")[0]
    fields = cluster.run("scontrol", "show", "job", "-o", leader).stdout.splitlines()
    nodelists = [dict(t.split("=", 1) for t in line.split() if "=" in t)["NodeList"] for line in fields]
    rows = sorted((int(r), int(tp), int(ep), int(local), node, addr) for r, tp, ep, local, node, addr in
                  (line.split() for line in (out / "trainer.txt").read_text().splitlines() if line.strip()))
    nodes = [_hostnames(cluster, nl) for nl in nodelists]
    return placement, nodes, rows, (out / "pattern").read_text().strip()


def test_segments_of_the_trainer_component_stay_inside_blocks(slurm24_cluster, het_run):
    placement, nodes, rows, pattern = het_run
    blocks = slurm24_cluster.blocks
    assert placement.train_segment == 2 and len(placement.train_nodes) == 4
    # The setup matters: with n0 and n6 busy, the first 4 free nodes (n1..n4) would span blocks b1, b2, b3.
    free = [n for n in slurm24_cluster.nodes if n not in BUSY]
    assert len({blocks[n] for n in free[:4]}) == 3

    assert pattern == "block.node"
    assert len(nodes) == 2
    rollout_nodes, train_nodes = nodes
    assert len(rollout_nodes) == 1 and not set(rollout_nodes) & set(train_nodes)
    # The only two blocks with 2 free nodes are b2 and b3; each 2-node segment takes one whole block.
    assert train_nodes == ["n2", "n3", "n4", "n5"]
    assert rollout_nodes[0] in {"n1", "n7"}
    # Tasks agree: ranks fill nodes in order, GPUS_PER_NODE per node; each segment's ranks share a block.
    seg_ranks = placement.train_segment * GPUS_PER_NODE
    for start in range(0, TRAINER.world_size, seg_ranks):
        seg = rows[start:start + seg_ranks]
        assert len({_block(addr) for *_, addr in seg}) == 1, seg
    assert [row[4] for row in rows] == [n for n in train_nodes for _ in range(GPUS_PER_NODE)]
    assert all(_block(addr) == blocks[node] and addr.endswith("." + node) for *_, node, addr in rows)


def test_planner_tp_and_ep_groups_each_lie_in_one_block(slurm24_cluster, het_run):
    placement, (_, train_nodes), rows, _ = het_run
    assert [r[0] for r in rows] == list(range(TRAINER.world_size))
    # Slurm's task layout is the planner's rank map: rank r on the rank_map[r] node (by position) and GPU.
    for rank, _, _, local, node, _ in rows:
        planned_node, planned_gpu = placement.rank_map[rank]
        assert train_nodes.index(node) == placement.train_nodes.index(planned_node)
        assert local == planned_gpu
    # The planner promises one domain per group; the tasks' SLURM_TOPOLOGY_ADDR confirms it on the cluster.
    assert set(placement.domains_spanned("tp")) == set(placement.domains_spanned("ep")) == {1}
    for column, groups in ((1, TRAINER.tp_groups()), (2, TRAINER.ep_groups())):
        by_group = defaultdict(set)
        for row in rows:
            by_group[row[column]].add(_block(row[5]))
        assert sorted(by_group) == list(range(len(groups)))
        assert all(len(b) == 1 for b in by_group.values()), dict(by_group)
    # Without --segment, the first free nodes (n1..n4) would have put EP group 0 (ranks 0-3) on n1 + n2: two blocks.
    naive = [n for n in slurm24_cluster.nodes if n not in BUSY][:4]
    assert {slurm24_cluster.blocks[naive[r // GPUS_PER_NODE]] for r in TRAINER.ep_groups()[0]} == {"b1", "b2"}


def test_four_node_job_waits_for_one_aggregated_block_of_four(slurm24_cluster, tmp_path):
    cluster = slurm24_cluster
    _need(cluster, 8, 2)
    with _busy(cluster, BUSY, tmp_path) as busy:
        job = cluster.run("sbatch", "--parsable", "-N4", "-t1", "-o", str(tmp_path / "n4.out"), "--wrap",
                          'srun bash -c "echo \\$SLURM_TOPOLOGY_ADDR"').stdout.strip()
        try:
            # 6 nodes are free, but each aggregated 4-node block (b[1-2] = n0-3, b[3-4] = n4-7) has a busy one.
            _wait_until("the scheduler to look at the 4-node job", lambda: _job_state(cluster, job)[1] != "None", 10)
            time.sleep(1)  # a few more scheduler passes (sched_interval=1, bf_interval=1)
            assert _job_state(cluster, job) == ("PENDING", "Resources")
            cluster.run("scancel", busy.pop("n6"))
            _wait_until("the 4-node job to finish", lambda: _job_state(cluster, job)[0] == "GONE", 30)
        finally:
            if _job_state(cluster, job)[0] != "GONE":
                cluster.run("scancel", job, check=False)
    addrs = sorted((tmp_path / "n4.out").read_text().split())
    assert addrs == ["b3.n4", "b3.n5", "b4.n6", "b4.n7"]


IMEX_SCRIPT = """#!/bin/bash
#SBATCH --nodes=2 --time=1 --output={out}/{name}.batch
echo "batch $(ls /dev/nvidia-caps-imex-channels | wc -l)" > {out}/{name}.txt
srun -N2 -n2 bash -c 'c=$(ls /dev/nvidia-caps-imex-channels); \
  echo "$SLURMD_NODENAME $c $(stat -c "%F %t %T" /dev/nvidia-caps-imex-channels/$c)"' >> {out}/{name}.txt
touch {out}/{name}.started
# Hold the allocation until the other job has started too, so both own a channel at the same time.
for i in $(seq 100); do [ -e {out}/{other}.started ] && break; sleep 0.2; done
"""


def test_imex_channel_is_shared_by_a_jobs_nodes_and_differs_between_jobs(slurm24_cluster, tmp_path):
    cluster = slurm24_cluster
    if not cluster.imex:
        pytest.fail("this test needs switch/nvidia_imex: "
                    "`tools/slurm24-dev-cluster down && tools/slurm24-dev-cluster up --imex`")
    jobs = []
    try:
        for name, other in (("a", "b"), ("b", "a")):
            script = tmp_path / f"{name}.sh"
            script.write_text(IMEX_SCRIPT.format(out=tmp_path, name=name, other=other))
            jobs.append(cluster.run("sbatch", "--parsable", str(script)).stdout.strip())
        _wait_until("both IMEX jobs to finish", lambda: all(_job_state(cluster, j)[0] == "GONE" for j in jobs), 45)
    finally:
        live = [j for j in jobs if _job_state(cluster, j)[0] != "GONE"]
        if live:
            cluster.run("scancel", *live, check=False)
    channels = {}
    for name in ("a", "b"):
        batch, *steps = (tmp_path / f"{name}.txt").read_text().splitlines()
        assert batch == "batch 0"                      # the batch step itself gets no channel device
        rows = [line.split(maxsplit=2) for line in steps]
        assert len(rows) == 2 and len({node for node, *_ in rows}) == 2, steps
        (channel,) = {c for _, c, _ in rows}          # the same channel on both nodes of the job
        n = int(re.fullmatch(r"channel(\d+)", channel).group(1))
        # A character device with the configured (fake) major 4000 = 0xfa0 and minor N.
        assert {dev for *_, dev in rows} == {f"character special file fa0 {n:x}"}
        channels[name] = n
    assert channels["a"] != channels["b"] and min(channels.values()) >= 1   # channel 0 is never handed out
