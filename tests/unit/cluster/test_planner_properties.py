"""Property tests of the topology planner (hypothesis): groups stay inside a domain whenever the numbers
allow it, every group that crosses a domain is explained by a line that names its constraint, and no
group kind crosses more than in node order.

Deterministic (derandomize=True, no example database) and bounded (200 examples), for 2-core CI.
"""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miles.cluster.planner import crossing_share, naive_placement, plan_placement
from miles.cluster.topology import ClusterShape, EngineLayout, TrainerLayout

PROFILE = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    gpn = draw(st.sampled_from([1, 2, 4, 8]))
    domain_nodes = draw(st.sampled_from([1, 2, 3, 4, 6, 9, 18]))
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8, 16) if t <= 4 * gpn]))
    cp, pp, dp = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4, 8]))
    ep = draw(st.sampled_from([e for e in (1, 2, 4, 8, 16, 32) if (tp * cp * dp) % e == 0]))
    trainer = TrainerLayout(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp)
    engine_tps = [t for t in (1, 2, 4, 8, 16, 32, 64) if t % gpn == 0 or gpn % t == 0]
    engines = tuple(EngineLayout(tp=draw(st.sampled_from(engine_tps)), num_engines=draw(st.integers(1, 4)))
                    for _ in range(draw(st.integers(0, 2))))
    need = -(-trainer.world_size // gpn) + sum(-(-e.tp * e.num_engines // gpn) for e in engines)
    num_nodes = need + draw(st.integers(0, 3 * domain_nodes))
    return ClusterShape(num_nodes, gpn, domain_nodes=domain_nodes), trainer, engines


def _parts(cluster, trainer, engines):
    """(atom GPUs, group GPUs) of each engine shape and of the trainer."""
    return [(e.tp, e.tp * e.num_engines) for e in engines] + [(trainer.atom_size, trainer.world_size)]


def _whole_fit_possible(cluster, trainer, engines) -> bool:
    """The numbers allow every group inside one domain: every atom divides the domain's GPUs, every group is
    whole chunks, and each group can have whole domains of its own."""
    if cluster.num_nodes % cluster.domain_nodes:
        return False
    gpn, dgpus, domains = cluster.gpus_per_node, cluster.domain_nodes * cluster.gpus_per_node, 0
    for atom, gpus in _parts(cluster, trainer, engines):
        chunk_gpus = atom * (gpn // math.gcd(atom, gpn))
        if dgpus % atom or gpus % chunk_gpus:
            return False
        domains += -(-gpus // dgpus)
    return domains <= len(cluster.domains)


@PROFILE
@given(cases())
def test_groups_stay_inside_a_domain_whenever_the_numbers_allow(case):
    cluster, trainer, engines = case
    p = plan_placement(cluster, trainer, engines)
    gpus = list(p.rank_map) + [g for e in p.engine_map for g in e]
    assert len(gpus) == len(set(gpus)) and not set(p.rollout_nodes) & set(p.train_nodes)
    if _whole_fit_possible(cluster, trainer, engines):
        for kind in ("tp", "ep", "engine"):
            assert set(p.domains_spanned(kind)) <= {1}, (kind, p.domains_spanned(kind))
        assert crossing_share(p, "ep") == 0.0
        assert not any("cross" in line or " > " in line for line in p.explanations), p.explanations


@PROFILE
@given(cases())
def test_no_group_kind_crosses_more_than_in_node_order(case):
    cluster, trainer, engines = case
    p, naive = plan_placement(cluster, trainer, engines), naive_placement(cluster, trainer, engines)
    for kind in ("ep", "tp", "engine"):
        assert crossing_share(p, kind) <= crossing_share(naive, kind), (kind, p.explanations)
    if any(line.endswith("node order is kept") for line in p.explanations):  # the fallback says what it did
        assert (p.rollout_nodes, p.train_nodes) == (naive.rollout_nodes, naive.train_nodes)


@PROFILE
@given(cases())
def test_every_crossing_is_explained_by_its_constraint(case):
    cluster, trainer, engines = case
    p = plan_placement(cluster, trainer, engines)
    dgpus = cluster.max_domain_nodes * cluster.gpus_per_node
    domain = f"{cluster.fabric} domain of {dgpus} GPUs ({cluster.max_domain_nodes} nodes x {cluster.gpus_per_node} GPUs)"
    if max(p.domains_spanned("tp") + p.domains_spanned("ep"), default=1) > 1:
        lines = [line for line in p.explanations if line.startswith("trainer ")]
        assert lines, p.explanations
        if trainer.atom_size > dgpus:  # the group itself is larger than a domain: the line says so, with numbers
            assert any(f"of {trainer.atom_size} GPUs" in line and f"> {domain}" in line for line in lines), lines
        else:
            assert any("cross a domain boundary" in line or "does not tile whole nodes" in line for line in lines)
    for e, spans in zip(engines, _spans_per_shape(p, engines)):
        if max(spans) > 1:
            named = [line for line in p.explanations if line.startswith(f"rollout engine of {e.tp} GPUs")]
            assert named, p.explanations
            if e.tp > dgpus:
                assert any(f"> {domain}: each spans at least {-(-e.tp // dgpus)} domains" in line for line in named)
    for name, seg, nodes in (("trainer", p.train_segment, len(p.train_nodes)),
                             ("rollout", p.rollout_segment, len(p.rollout_nodes))):
        if seg is not None:  # Slurm requires the segment to divide the group's nodes and fit a block
            assert nodes % seg == 0 and seg <= cluster.max_domain_nodes
        elif cluster.max_domain_nodes > 1 and (name == "trainer" or engines):
            assert any(f"no --segment for the {name} group" in line for line in p.explanations), p.explanations


def _spans_per_shape(p, engines):
    spans, start = p.domains_spanned("engine"), 0
    for e in engines:
        yield spans[start:start + e.num_engines]
        start += e.num_engines


@PROFILE
@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 3]), st.integers(1, 4))
def test_a_group_larger_than_any_domain_names_the_sizes(gpn, domain_nodes, factor):
    # An EP group of (domain GPUs x 2^factor): impossible to keep in one domain, and the explanation says why.
    cluster = ClusterShape(domain_nodes * 2 ** (factor + 1), gpn, domain_nodes=domain_nodes, fabric="xGMI")
    ep = domain_nodes * gpn * 2 ** factor
    p = plan_placement(cluster, TrainerLayout(tp=1, ep=ep, dp=ep))
    assert min(p.domains_spanned("ep")) >= 2 ** factor
    want = (f"trainer EP group of {ep} GPUs (ep={ep} x etp=1) > xGMI domain of {domain_nodes * gpn} GPUs "
            f"({domain_nodes} nodes x {gpn} GPUs): each spans at least {2 ** factor} domains")
    assert want in p.explanations, p.explanations
