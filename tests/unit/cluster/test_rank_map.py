"""Applying the planner's rank map before torch.distributed starts, and the submit-time --segment plan."""

import threading

import pytest

from miles.cluster.job_placement import apply_rank_map, describe_placement, submit_placement
from miles.cluster.platforms import check_imex_channels, get_platform
from miles.cluster.slurm_env import SlurmEnv
from miles.config.loader import load_config
from miles.errors import ConfigError

UUID = "5d3c0b1e-8f2a-4c6d-9e1f-0a1b2c3d4e5f"
# 4 GB200-like nodes, 4 GPUs each; Slurm lists them n0 n1 n2 n3, but the NVLink cliques are {n0, n2} and {n1, n3}.
CLIQUE = {"n0": "1", "n1": "2", "n2": "1", "n3": "2"}


def _smi(clique: str) -> str:
    return "".join(f"GPU 00000000:0{g}:00.0\n    Fabric\n        State                             : Completed\n"
                   f"        CliqueId                          : {clique}\n"
                   f"        ClusterUUID                       : {UUID}\n" for g in range(4))


def _task(cfg, run_dir, node: str, local: int, results: dict) -> None:
    env = {"SLURM_JOB_ID": "41", "SLURM_HET_SIZE": "2", "SLURM_JOB_NODELIST_HET_GROUP_1": "n0,n1,n2,n3",
           "SLURMD_NODENAME": node}
    slurm = SlurmEnv(env)
    procid = ["n0", "n1", "n2", "n3"].index(node) * 4 + local
    base = {"RANK": str(procid), "WORLD_SIZE": "16", "LOCAL_RANK": str(local), "MASTER_ADDR": "addr-n0",
            "MASTER_PORT": "10000"}
    run = lambda cmd: _smi(CLIQUE[node]) if cmd[0] == "nvidia-smi" else None  # noqa: E731
    results[(node, local)] = apply_rank_map(cfg, slurm, base, str(run_dir), run=run, addr_of=lambda n: f"addr-{n}")


def test_every_task_takes_its_planned_rank_so_ep_groups_stay_in_one_clique(tmp_path):
    # TP=4, EP=8 (etp 1), DP=4: world 16 on 4 nodes of 4 GPUs; an EP group = 8 ranks = 2 nodes.
    cfg = load_config("quickstart", ["trainer.tensor_model_parallel_size=4", "plan.expert_parallel=8",
                                     "cluster.rendezvous_timeout_s=30"])
    results: dict = {}
    threads = [threading.Thread(target=_task, args=(cfg, tmp_path, n, g, results)) for n in CLIQUE for g in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 16
    rank = {task: int(env["RANK"]) for task, (env, _) in results.items()}
    assert sorted(rank.values()) == list(range(16))  # a permutation: every rank exactly once
    assert all(env["LOCAL_RANK"] == str(g) for (_, g), (env, _) in results.items())  # the task keeps its GPU
    assert all(rank[(n, g)] % 4 == g for (n, g) in rank)  # node-major: local GPU g holds rank % 4 == g
    for group in (range(0, 8), range(8, 16)):  # EP groups: ranks 0-7 and 8-15
        nodes = {n for (n, g), r in rank.items() if r in group}
        assert len({CLIQUE[n] for n in nodes}) == 1, f"EP group {group} spans cliques: nodes {nodes}"
    master = next(n for (n, g), r in rank.items() if r == 0)
    assert {env["MASTER_ADDR"] for env, _ in results.values()} == {f"addr-{master}"}
    found = results[("n0", 0)][1]
    assert found.source.startswith("NVLink fabric") and found.shape.blocks == (("n0", "n2"), ("n1", "n3"))


def test_submit_plan_of_glm5_on_gb200_segments_and_explanations():
    cfg = load_config("glm5", ["cluster.platform=gb200", "cluster.gpus_per_node=4", "cluster.nodes_rollout=16",
                               "cluster.nodes_train=32"])
    placement, why = submit_placement(cfg)
    assert why == "" and (placement.rollout_segment, placement.train_segment) == (16, 8)
    assert set(placement.domains_spanned("ep")) == {1} and set(placement.domains_spanned("engine")) == {1}
    assert "--segment=8 of the trainer group does not divide the 18-node domain: 2 nodes" in describe_placement(cfg)
    h100, why = submit_placement(load_config("glm5", ["cluster.platform=h100"]))
    assert h100 is None and why.startswith("no --segment: every NVLink domain is one node")


def test_platform_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="cluster.platform=gb200 has 4 GPUs per node, but cluster.gpus_per_node=8"):
        load_config("glm5", ["cluster.platform=gb200"])
    with pytest.raises(ConfigError, match="is not one of gb200, gb300, h100, h200, mi355x"):
        load_config("quickstart", ["cluster.platform=tpu"])
    with pytest.raises(ConfigError, match="imex_channel_per_segment needs a platform that uses IMEX"):
        load_config("quickstart", ["cluster.platform=h100", "cluster.imex_channel_per_segment=true"])
    with pytest.raises(ConfigError, match="unknown platform 'b200'"):
        get_platform("b200")


def test_imex_channel_check(tmp_path):
    with pytest.raises(ConfigError, match=r"platform gb300 uses multi-node NVLink.*has no channel\* device.*"
                                          r"SwitchType=switch/nvidia_imex"):
        check_imex_channels("gb300", str(tmp_path))
    assert check_imex_channels("h100", str(tmp_path)) == []  # no IMEX needed: no error
    (tmp_path / "channel3").touch()
    assert check_imex_channels("gb200", str(tmp_path)) == ["channel3"]
