"""The topology planner: hand-computed placements, explanations, determinism and seeded random properties.

The random property test draws 800 shapes from a seeded random.Random (the hypothesis ones are in
test_planner_properties.py; never-worse-than-node-order at scale in test_planner_scale.py).
"""

import random

import pytest

from miles.cluster.planner import crossing_share, naive_placement, plan_placement
from miles.cluster.topology import ClusterShape, EngineLayout, TrainerLayout
from miles.errors import ConfigError


def test_two_blocks_of_two_nodes_keep_each_ep_group_in_one_block():
    # 4 nodes x 4 GPUs, blocks {a0,a1} {b0,b1}; rollout: 2 engines of 4 GPUs; trainer TP=2 EP=4 DP=4 -> world 8.
    cluster = ClusterShape(4, 4, blocks=(("a0", "a1"), ("b0", "b1")))
    p = plan_placement(cluster, TrainerLayout(tp=2, ep=4, dp=4), EngineLayout(tp=4, num_engines=2))
    assert p.trainer.ep_groups() == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert p.domains_spanned("ep") == (1, 1) and p.domains_spanned("engine") == (1, 1)
    # Trainer atom lcm(2, 4) = 4 GPUs = 1 node; engines 1 node each; both groups fit one block each.
    assert sorted(p.rollout_nodes + p.train_nodes) == [0, 1, 2, 3]
    assert p.rank_map[:5] == ((p.train_nodes[0], 0), (p.train_nodes[0], 1), (p.train_nodes[0], 2),
                              (p.train_nodes[0], 3), (p.train_nodes[1], 0))
    assert p.explanations == ()
    assert crossing_share(p, "ep") == 0.0


def test_ep_group_of_two_nodes_lands_in_one_block_where_naive_order_crosses():
    # 6 nodes x 4 GPUs in 3 blocks of 2; one engine of 4 GPUs (1 node) first, then TP=4 EP=8 (etp=1, dp=2):
    # EP group = 8 GPUs = 2 nodes. Naive: trainer on nodes 1,2 (blocks 0 and 1) -> crosses.
    cluster = ClusterShape(6, 4, domain_nodes=2)
    trainer, engines = TrainerLayout(tp=4, ep=8, dp=2), EngineLayout(tp=4)
    p, naive = plan_placement(cluster, trainer, engines), naive_placement(cluster, trainer, engines)
    assert naive.train_nodes == (1, 2) and naive.domains_spanned("ep") == (2,)
    assert crossing_share(naive, "ep") == pytest.approx(16 / 28)  # 4 x 4 pairs cross of C(8, 2) = 28
    assert p.domains_spanned("ep") == (1,) and crossing_share(p, "ep") == 0.0
    assert p.train_segment == 2 and p.rollout_segment == 1
    assert p.train_nodes == (0, 1) and p.rollout_nodes == (2,)  # largest chunk first, then best fit


def test_ep_group_larger_than_a_domain_is_explained_and_spans_the_fewest_domains():
    cluster = ClusterShape(8, 8, domain_nodes=1, fabric="xGMI")
    p = plan_placement(cluster, TrainerLayout(tp=1, ep=16, dp=32))
    assert p.domains_spanned("ep") == (2, 2)
    assert any("trainer EP group of 16 GPUs (ep=16 x etp=1) > xGMI domain of 8 GPUs (1 nodes x 8 GPUs): "
               "each spans at least 2 domains" in line for line in p.explanations)
    assert p.train_segment is None
    assert crossing_share(p, "ep") == pytest.approx(64 / 120)


def test_engine_larger_than_an_nvl72_domain_is_explained():
    cluster = ClusterShape(36, 4, domain_nodes=18)
    p = plan_placement(cluster, TrainerLayout(tp=4, dp=1), EngineLayout(tp=96, ep=96, dp=96))
    assert p.domains_spanned("engine") == (2,)
    assert any(line.startswith("rollout engine of 96 GPUs (tp=96, ep=96, dp=96) > NVLink domain of 72 GPUs")
               for line in p.explanations)


def test_segment_prefers_a_divisor_of_the_domain_and_says_when_none_divides():
    cluster = ClusterShape(36, 4, domain_nodes=18)
    p = plan_placement(cluster, TrainerLayout(tp=4, ep=12, dp=12))  # atom 12 GPUs = 3 nodes, 36 nodes trainer
    assert p.train_segment == 3
    glm = plan_placement(cluster, TrainerLayout(tp=4, pp=4, cp=2, ep=32, dp=4))  # 8-node chunks, 32 nodes
    assert glm.train_segment == 8 and glm.domains_spanned("ep") == (1,) * 4
    assert any("--segment=8 of the trainer group does not divide the 18-node domain: 2 nodes" in line
               for line in glm.explanations)


def test_user_errors():
    with pytest.raises(ConfigError, match="need 5 nodes of 4 GPUs, the cluster has 4"):
        plan_placement(ClusterShape(4, 4, domain_nodes=2), TrainerLayout(tp=4, dp=5))
    with pytest.raises(ConfigError, match="ep \\* etp = 3 \\* 1 must divide tp \\* cp \\* dp = 4"):
        TrainerLayout(tp=4, ep=3)
    with pytest.raises(ConfigError, match="engine tp=3 must divide gpus_per_node=4"):
        plan_placement(ClusterShape(4, 4, domain_nodes=2), TrainerLayout(), EngineLayout(tp=3))
    with pytest.raises(ConfigError, match="exactly one"):
        ClusterShape(4, 4)
    with pytest.raises(ConfigError, match="the blocks name 3 nodes but num_nodes=4"):
        ClusterShape(4, 4, blocks=(("a", "b"), ("c",)))


@pytest.mark.parametrize("tp,pp,cp,dp,ep,etp", [(4, 4, 2, 4, 32, 1), (2, 2, 1, 8, 4, 2), (4, 1, 2, 2, 4, 4),
                                                (1, 3, 1, 8, 8, 1)])
def test_groups_match_megatron_core_rank_generator(tp, pp, cp, dp, ep, etp):
    from megatron.core.parallel_state import RankGenerator

    layout = TrainerLayout(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp, etp=etp)
    order = "tp-cp-ep-dp-pp"
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    expert = RankGenerator(tp=etp, ep=ep, dp=layout.world_size // (etp * ep * pp), pp=pp, cp=1, order=order)
    assert sorted(layout.tp_groups()) == sorted(tuple(g) for g in dense.get_ranks("tp"))
    assert sorted(layout.ep_groups()) == sorted(tuple(g) for g in expert.get_ranks("ep"))


def _random_case(rng: random.Random):
    gpn = rng.choice([1, 2, 4, 8])
    domain_nodes = rng.choice([1, 2, 3, 4, 6, 9, 18])
    tp = rng.choice([t for t in (1, 2, 4, 8, 16) if t <= 4 * gpn])
    cp, pp = rng.choice([1, 2]), rng.choice([1, 2, 4])
    dp = rng.choice([1, 2, 4, 8])
    ep = rng.choice([e for e in (1, 2, 4, 8, 16, 32) if (tp * cp * dp) % e == 0])
    trainer = TrainerLayout(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp)
    etp_choices = [t for t in (1, 2, 4, 8, 16, 32) if t % gpn == 0 or gpn % t == 0]
    engines = tuple(EngineLayout(tp=rng.choice(etp_choices), num_engines=rng.randint(1, 4))
                    for _ in range(rng.randint(0, 2)))
    need = -(-trainer.world_size // gpn) + sum(-(-e.tp * e.num_engines // gpn) for e in engines)
    num_nodes = need + rng.randint(0, 3 * domain_nodes)
    if rng.random() < 0.3:
        sizes = []
        while sum(sizes) < num_nodes:
            sizes.append(rng.randint(1, domain_nodes))
        names = iter(f"n{i}" for i in range(sum(sizes)))
        cluster = ClusterShape(sum(sizes), gpn, blocks=tuple(tuple(next(names) for _ in range(s)) for s in sizes))
    else:
        cluster = ClusterShape(num_nodes, gpn, domain_nodes=domain_nodes)
    return cluster, trainer, engines


def _whole_fit_possible(cluster, trainer, engines) -> bool:
    """Uniform domains, every atom tiles a domain exactly, every group is whole chunks, and each group
    could have whole domains of its own: then every group must stay inside one domain."""
    if cluster.blocks or cluster.num_nodes % cluster.domain_nodes:
        return False
    gpn, dgpus = cluster.gpus_per_node, cluster.domain_nodes * cluster.gpus_per_node
    parts = [(e.tp, e.tp * e.num_engines) for e in engines] + [(trainer.atom_size, trainer.world_size)]
    domains = 0
    for atom, gpus in parts:
        chunk_gpus = atom * (gpn // __import__("math").gcd(atom, gpn))
        if atom > dgpus or dgpus % atom or gpus % chunk_gpus:
            return False
        domains += -(-gpus // dgpus)
    return domains <= len(cluster.domains)


def test_random_shapes_properties():
    rng = random.Random(20261126)
    checked_whole = 0
    for _ in range(800):
        cluster, trainer, engines = _random_case(rng)
        p = plan_placement(cluster, trainer, engines)
        assert p == plan_placement(cluster, trainer, engines)  # deterministic
        gpus = list(p.rank_map) + [g for e in p.engine_map for g in e]
        assert len(gpus) == len(set(gpus))  # every GPU used at most once
        assert all(0 <= gpu < cluster.gpus_per_node for _, gpu in gpus)
        assert not set(p.rollout_nodes) & set(p.train_nodes)  # het groups own whole nodes
        assert {n for n, _ in p.rank_map} == set(p.train_nodes)  # rank map is onto the trainer's nodes
        assert len(p.rank_map) == trainer.world_size == len(set(p.rank_map))
        dgpus = cluster.max_domain_nodes * cluster.gpus_per_node
        for kind, size in (("ep", trainer.ep * trainer.etp), ("tp", trainer.tp)):
            spans = p.domains_spanned(kind)
            assert all(s >= -(-size // dgpus) for s in spans)
        if _whole_fit_possible(cluster, trainer, engines):
            checked_whole += 1
            assert set(p.domains_spanned("ep")) <= {1} and set(p.domains_spanned("tp")) <= {1}
            assert set(p.domains_spanned("engine")) <= {1}
            assert crossing_share(p, "ep") == 0.0
            assert not any("cross" in line or " > " in line for line in p.explanations)
        elif max(p.domains_spanned("ep") + p.domains_spanned("tp") + p.domains_spanned("engine") + (1,)) > 1:
            assert p.explanations  # every crossing is explained
    assert checked_whole >= 30
