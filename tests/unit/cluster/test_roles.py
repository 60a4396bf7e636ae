"""Ports from the job id, the het-job layout from the config, and each task's role."""

import pytest

from miles.cluster.roles import (MAX_ENGINE_TASKS_PER_NODE, NUM_PORT_BLOCKS, PORT_HI, PORT_LO, EngineTask, HetLayout,
                                 JobPorts, Role)
from miles.config.loader import load_config
from miles.errors import ConfigError


def test_ports_are_deterministic_distinct_and_in_the_safe_range():
    p = JobPorts.for_job(1234)
    assert p == JobPorts.for_job(1234)
    assert p.base == PORT_LO + (1234 % NUM_PORT_BLOCKS) * 64
    used = [p.master, p.router] + [p.engine_http(i) for i in range(MAX_ENGINE_TASKS_PER_NODE)] + \
           [p.engine_dist(i) for i in range(MAX_ENGINE_TASKS_PER_NODE)]
    assert len(set(used)) == len(used)
    assert all(p.base <= port < p.base + 64 for port in used)
    assert PORT_LO <= min(used) and max(used) < PORT_HI <= 32768  # below Linux's ephemeral ports
    # consecutive job ids get disjoint blocks; ids NUM_PORT_BLOCKS apart share one
    assert abs(JobPorts.for_job(1235).base - p.base) >= 64
    assert JobPorts.for_job(1234 + NUM_PORT_BLOCKS) == p
    with pytest.raises(ConfigError, match="at most 28 engine tasks"):
        p.engine_http(MAX_ENGINE_TASKS_PER_NODE)


def test_quickstart_layout_is_cpu_only():
    lay = HetLayout.from_config(load_config("quickstart"))
    assert (lay.nodes_rollout, lay.nodes_train, lay.gpus_per_node) == (1, 1, 0)
    assert (lay.engine_tasks, lay.engine_tasks_per_node, lay.engine_gpus_per_task) == (2, 2, 0)
    assert (lay.trainers_per_node, lay.train_tasks) == (1, 1)


def test_gpu_layout_one_engine_per_gpu_group():
    cfg = load_config("quickstart", ["cluster.gpus_per_node=8", "cluster.gpus_per_engine=2", "engine.num_engines=7",
                                     "cluster.nodes_rollout=2", "cluster.nodes_train=3"])
    lay = HetLayout.from_config(cfg)
    assert (lay.engine_tasks, lay.engine_tasks_per_node, lay.engine_gpus_per_task, lay.nodes_per_engine) == (7, 4, 2, 1)
    assert (lay.trainers_per_node, lay.train_tasks) == (8, 24)


def test_multi_node_engines_take_one_task_per_node():
    cfg = load_config("glm5")
    lay = HetLayout.from_config(cfg)
    assert (lay.nodes_per_engine, lay.engine_tasks, lay.engine_tasks_per_node, lay.engine_gpus_per_task) == (8, 8, 1, 0)
    assert [EngineTask.from_procid(t, lay) for t in (0, 7)] == [EngineTask(0, 0), EngineTask(0, 7)]
    two = HetLayout.from_config(load_config("glm5", ["engine.num_engines=2", "cluster.nodes_rollout=16"]))
    assert EngineTask.from_procid(9, two) == EngineTask(index=1, node_rank=1)
    with pytest.raises(ConfigError, match="engine task 16 does not exist"):
        EngineTask.from_procid(16, two)


def test_layouts_that_cannot_fit_are_config_errors():
    with pytest.raises(ConfigError, match=r"9 engine\(s\) of 2 GPUs need 3 rollout node\(s\) of 8 GPUs, but "
                                          r"cluster.nodes_rollout=2"):
        HetLayout.from_config(load_config("quickstart", ["cluster.gpus_per_node=8", "cluster.gpus_per_engine=2",
                                                          "engine.num_engines=9", "cluster.nodes_rollout=2"]))
    with pytest.raises(ConfigError, match="multi-node engine, which only engine.kind=sglang supports"):
        HetLayout.from_config(load_config("quickstart", ["cluster.gpus_per_node=4", "cluster.gpus_per_engine=8"]))
    with pytest.raises(ConfigError, match="must divide cluster.gpus_per_node=8 or be a multiple"):
        load_config("quickstart", ["cluster.gpus_per_node=8", "cluster.gpus_per_engine=3"])


def test_roles_name_their_group_rank_and_log():
    t1 = Role("trainer", rank=1, restart=2)
    assert (t1.group, t1.group_name, t1.label, t1.log_file()) == (1, "train", "het-group 1 (train) rank 1", "train-1.r2.log")
    e3 = Role("engine", rank=3, restart=0)
    assert (e3.group, e3.label, e3.log_file()) == (0, "het-group 0 (rollout) rank 3", "rollout-3.r0.log")
    r = Role("router", rank=0, restart=1)
    assert (r.label, r.log_file()) == ("het-group 0 (rollout) router", "rollout-router.r1.log")
