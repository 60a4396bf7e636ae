"""The real Miles het job on a real Slurm 24.11 block topology: --segment from the planner at submit, the
fabric domains discovered at run time, and each trainer's RANK from the planner's rank map before
torch.distributed starts (issue 8, item 2).

Needs `tools/slurm24-dev-cluster up --imex` (8 nodes n0..n7 in base blocks of 2; `tools/run-tests` starts it).
`miles-submit` runs the CI-sized quickstart (tiny Qwen3, 1 RL step, no SFT): 1 embedded engine + the router
on one node (het group 0) and 4 CPU trainer ranks (gloo), TP=2 x DP=2, one per node (1 fake GPU per node) in
het group 1. `cluster.domain_nodes=2` = the block size, so miles-submit renders `--segment=2` for the trainer.
Run: tools/slurm24-dev-cluster up --imex &&
     MILES_REQUIRE_SLURM=1 python -m pytest tests/integration/slurm/test_miles_job_blocks.py -q -s
"""

import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from miles.cluster.discovery import expand_hostlist
from miles.cluster.planner import plan_placement
from miles.cluster.topology import ClusterShape, TrainerLayout

pytestmark = pytest.mark.slurm

TRAINER = TrainerLayout(tp=2, dp=2)   # 4 ranks, one per node: a TP group (atom) = 2 nodes = one block
BUSY = ("n2", "n6")                   # one node of b2 and of b4 held before the job
SCONTROL_SOURCE = "scontrol show topology (topology/block)"


def _need_blocks_of_two(cluster) -> None:
    sizes = defaultdict(int)
    for block in cluster.blocks.values():
        sizes[block] += 1
    if len(cluster.nodes) != 8 or set(sizes.values()) != {2}:
        pytest.fail(f"this test needs 8 nodes in base blocks of 2 (`tools/slurm24-dev-cluster up`), got {dict(sizes)}")


def _planned(cluster, nodes: list[str], layout: TrainerLayout = TRAINER):
    """The planner's trainer placement over `nodes` (Slurm's order), blocks as the host's `scontrol show topology`
    names them: what every trainer task must have computed from its own discovery."""
    blocks: dict[str, list[str]] = {}
    for node in nodes:
        blocks.setdefault(cluster.blocks[node], []).append(node)
    shape = ClusterShape(len(nodes), layout.world_size // len(nodes), blocks=tuple(map(tuple, blocks.values())))
    return plan_placement(shape, layout), shape.node_names


def _field(log: str, pattern: str) -> re.Match:
    m = re.search(pattern, log)
    assert m, f"no line matching {pattern!r} in:\n{log[-3000:]}"
    return m


def _trainer_rows(logs: Path) -> list[dict]:
    """One row per trainer task from its log: task (SLURM_PROCID), node, RANK, MASTER_ADDR, domain source and
    megatron's parallel state (its TP/DP groups as built by initialize_model_parallel)."""
    rows = []
    for path in sorted(logs.glob("train-*.r0.log")):
        log = path.read_text()
        ranked = _field(log, r"rank \d+ \(task (\d+)\): domains from (.+)")
        task = int(ranked.group(1))
        # srun's --output=train-%t names task 0's log train-4294967295 in 24.11 het steps; the template names its own
        assert path.name == f"train-{task}.r0.log" and f"[het-group 1 (train) rank {task} r0]" in log, path.name
        start = _field(log, r"trainer rank (\d+) of (\d+) on (\S+), pid \d+, master (\S+):(\d+)")
        state = dict(re.findall(r"(\w+)=([^,)]+)", _field(log, r"parallel state: ParallelState\((.*)\)").group(1)))
        rows.append({"task": task, "rank": int(start.group(1)), "world": int(start.group(2)), "node": start.group(3),
                     "master": start.group(4), "port": start.group(5), "source": ranked.group(2).strip(),
                     "state": {k: int(v) for k, v in state.items() if v.isdigit()}, "log": log})
    return rows


def test_miles_het_job_trains_with_planned_ranks_on_discovered_blocks(slurm24_cluster, hold_nodes24, tiny_model,
                                                                      quickstart_data, tmp_path):
    cluster = slurm24_cluster
    _need_blocks_of_two(cluster)
    free = [n for n in cluster.nodes if n not in BUSY]
    # The setup matters: in node order (rollout first, then the trainer) TP group 0 would be n1 + n3, two blocks.
    naive_train = free[1:5]
    assert any(len({cluster.blocks[naive_train[r]] for r in g}) == 2 for g in TRAINER.tp_groups()), naive_train

    hold_nodes24(*BUSY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILES_") and k != "SLURM_CONF"}
    env["PATH"] = f"{cluster.bin_dir}:{env['PATH']}"  # miles-submit's sbatch/sinfo/scontrol: the 24.11 clients
    submitted = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "miles.launchers.submit", "--recipe", "quickstart", f"model.path={tiny_model}",
         f"rollout.data_path={quickstart_data / 'prompts.jsonl'}", f"sft.data_path={quickstart_data / 'sft.jsonl'}",
         "sft.steps=0", "run.num_steps=1", "run.name=blocks", "rollout.rollout_batch_size=4", "engine.num_engines=1",
         "--nodes-rollout", "1", "--nodes-train", "4", "--gpus-per-node", "1", "cluster.gpus_per_engine=1",
         f"trainer.tensor_model_parallel_size={TRAINER.tp}", "cluster.domain_nodes=2", "--follow"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - submitted
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    job_id = re.search(r"submitted het job (\d+)", proc.stdout).group(1)
    assert f"job {job_id} ended: COMPLETED" in proc.stdout and "miles-het: OK: training finished" in proc.stdout

    run = tmp_path / "runs" / "blocks"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["step"] >= 0 and "train/loss" in s] == [0]

    # Submit: the planner's --segment=2 for the trainer group (after the `hetjob` line) of the rendered script.
    (script,) = (run / "submitit").glob(f"{job_id}_submission.sh")
    group1 = script.read_text().split("#SBATCH hetjob\n", 1)[1]
    assert "#SBATCH --segment=2\n" in group1 and "#SBATCH --nodes=4\n" in group1

    # Allocation: each segment is one whole block; with n2 and n6 busy only b1 and b3 have 2 free nodes.
    batch = (run / "submitit" / f"{job_id}_0_log.out").read_text()
    nodelists = _field(batch, r"rollout nodes (\S+), train nodes (\S+);")
    rollout, train = expand_hostlist(nodelists.group(1)), expand_hostlist(nodelists.group(2))
    assert train == ["n0", "n1", "n4", "n5"] and rollout in (["n3"], ["n7"]), (rollout, train)

    # Discovery: the LOCAL_RANK-0 task of each trainer node wrote its identity; the first node carries scontrol's text.
    for node in train:
        ident = json.loads((run / "topology" / f"{node}.json").read_text())
        assert (ident["job_id"], ident["restart"]) == (int(job_id), 0)
        assert (ident["topology_addr"], ident["topology_pattern"]) == (f"{cluster.blocks[node]}.{node}", "block.node")
        assert ("BlockName=b1 " in ident["scontrol_topology"]) == (node == train[0]), ident

    # Run time: every task's RANK is the planner's for the blocks, and megatron's TP groups stay in one block.
    assert {p.name for p in (run / "logs").glob("rollout-*.log")} == {"rollout-0.r0.log", "rollout-router.r0.log"}
    rows = _trainer_rows(run / "logs")
    placement, names = _planned(cluster, train)
    assert sorted(r["rank"] for r in rows) == list(range(TRAINER.world_size)) and {r["world"] for r in rows} == {4}
    assert {r["source"] for r in rows} == {SCONTROL_SOURCE}
    for r in rows:
        node_index, gpu = placement.rank_map[r["rank"]]
        assert (r["node"], r["state"]["local_rank"]) == (names[node_index], gpu), r
        assert r["state"]["rank"] == r["rank"]  # torch.distributed's rank is the one the rank map gave
    tp_groups = defaultdict(set)  # megatron: TP group = ranks with the same (dp_rank, pp_rank); tp_rank = position
    for r in rows:
        assert r["state"]["tp_rank"] == r["rank"] % TRAINER.tp
        tp_groups[r["state"]["dp_rank"]].add(cluster.blocks[r["node"]])
    assert len(tp_groups) == TRAINER.dp and all(len(b) == 1 for b in tp_groups.values()), dict(tp_groups)
    master = next(r["node"] for r in rows if r["rank"] == 0)
    assert {(r["master"], r["port"]) for r in rows} == {(master, rows[0]["port"])}  # names resolve in the chroot
    rank0 = next(r["log"] for r in rows if r["rank"] == 0)
    assert f"trainer node order {','.join(names[i] for i in placement.train_nodes)}" in rank0

    def stamp(what: str) -> float:  # the log line's asctime (a progress bar may precede it on the line)
        return time.mktime(time.strptime(_field(rank0, r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\S* \[.*" + what).group(1),
                                         "%Y-%m-%d %H:%M:%S"))

    print(f"miles het job {job_id} on 24.11 blocks: rollout {rollout}, trainer {train}, "
          f"ranks by task {[r['rank'] for r in sorted(rows, key=lambda r: r['task'])]}, master {master}; "
          f"submit -> COMPLETED {wall:.1f} s, trainer start -> step 0 "
          f"{stamp('step 0:') - stamp('trainer rank 0 of'):.0f} s")


def test_rank_map_reorders_ranks_where_slurm_order_splits_tp_groups(slurm24_cluster, tmp_path):
    """Where the allocation is not whole blocks, the rank map is what keeps TP groups in one block: 6 tasks on
    n1..n6 (blocks b1 b2 b2 b3 b3 b4; a job of 5-8 nodes needs the aggregated block of 8, and -w picks inside it)
    join torch.distributed through role.py's dist-check with TP=2 and cluster.rank_order=topology (the default).
    In Slurm's order (RANK = SLURM_PROCID) all three TP groups would cross blocks."""
    cluster = slurm24_cluster
    _need_blocks_of_two(cluster)
    layout, nodes = TrainerLayout(tp=2, dp=3), ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert all(len({cluster.blocks[nodes[r]] for r in g}) == 2 for g in layout.tp_groups())  # SLURM_PROCID order
    out = cluster.run(
        "srun", "-l", f"-N{len(nodes)}", f"-n{len(nodes)}", f"--nodelist={','.join(nodes)}", "-t1",
        f"--chdir={tmp_path}", sys.executable, "-m", "miles.launchers.role", "dist-check", "--recipe", "quickstart",
        f"trainer.tensor_model_parallel_size={layout.tp}", f"run.output_dir={tmp_path}",
        "cluster.rendezvous_timeout_s=60", timeout=120).stdout
    rows = {int(task): (int(rank), master, node, total) for task, rank, master, total, node in re.findall(
        r"^(\d+): dist-check rank=(\d) world_size=6 local_rank=0 master=(\S+) bootstrap=env all_reduce=(\S+) "
        r"expected=21 node=(\S+)$", out, re.M)}
    assert sorted(rows) == list(range(6)), out
    assert [rows[t][2] for t in range(6)] == nodes  # Slurm's task order: one task per node in node order
    assert {total for *_, total in rows.values()} == {"21"}  # the permuted ranks form one world (1+...+6)
    placement, names = _planned(cluster, nodes, layout)
    rank_of = {node: rank for rank, _, node, _ in rows.values()}
    assert sorted(rank_of.values()) == list(range(6))
    assert all(names[placement.rank_map[rank][0]] == node for node, rank in rank_of.items())
    assert any(rank_of[n] != t for t, n in enumerate(nodes))  # the map changed Slurm's order
    spans = sorted(tuple(sorted({cluster.blocks[n] for n in nodes if rank_of[n] in g})) for g in layout.tp_groups())
    assert spans == [("b1", "b4"), ("b2",), ("b3",)]  # n2+n3 and n4+n5 share a block; n1+n6 cannot
    master = next(n for n, r in rank_of.items() if r == 0)
    assert {m for _, m, _, _ in rows.values()} == {f"{master}:{rows[0][1].split(':')[1]}"}
    print(f"rank map on {','.join(nodes)}: ranks {[rank_of[n] for n in nodes]}, master {master}")
