"""The topology planner: which nodes each het group gets, its --segment, and where every rank runs.

    placement = plan_placement(ClusterShape(1152, 4, domain_nodes=18), TrainerLayout(tp=4, pp=4, cp=2, ep=32, dp=72),
                               (EngineLayout(tp=64, ep=64, dp=64, num_engines=36),))
    placement.rank_map[r]          # trainer rank r -> (node index, local GPU)
    placement.train_segment        # sbatch --segment of het group 1 (None: do not pass one)
    crossing_share(placement, "ep")                 # share of EP all-to-all pairs that cross a domain
    crossing_share(naive_placement(...), "ep")      # what node-by-node order would give (never less)

Pure and deterministic: the same inputs give the same Placement, nothing is read from the machine.

How it plans. Each group's GPUs are filled node by node in its node order (het group 0 = the
rollout engines, shape after shape; het group 1 = the trainer ranks), so what the planner chooses
is which nodes, in which order. A *chunk* is the fewest whole nodes that hold a whole number of
atoms, where an atom is what must stay inside one domain: an engine (tp GPUs), or for the trainer
lcm(tp, ep * etp) consecutive ranks, which are whole TP groups and whole EP groups (the layout's
module doc gives the rank order). Chunks are packed in an order: each goes best-fit into the domain
with the least free room that still holds it whole, so domains are filled before new ones are
opened; a chunk that no domain can hold whole is split over the fewest domains (those with the most
free nodes first), and `Placement.explanations` says which constraint failed, with the numbers.

Which order. By default largest chunks first (both groups). Every plan is scored against node order
(`naive_placement`) by the crossing pairs of each part: trainer EP groups, trainer TP groups, the
engines of each shape. When largest-first crosses more pairs than node order for some part, the
domain remainders are the cause: e.g. GLM-5 on 32 NVL72 racks, a 16-node engine leaves 2 nodes of its
18-node rack that only a split 8-node EP chunk can use. Then that part's chunks are packed earlier:
before the m-th chunk of the others, m the latest position (bisection) at which that part crosses no
more than node order. Of all plans tried, those crossing no more than node order for every part are
kept, and the one with the fewest crossing GPU pairs in total wins (earlier tried on ties); when
none is kept, node order itself is the plan. So the plan is never worse than node order for any
part, and an explanation line gives the shares when the order is not largest-first.

--segment of a group = the smallest multiple of its chunk that divides the group's node count
(Slurm requires that) and fits in a domain, preferring one that also divides the domain size (so
no block is left with unusable nodes); None when no such size exists or domains are single nodes.
"""

import heapq
import logging
import math
from dataclasses import dataclass
from typing import Sequence

from miles.cluster.topology import ClusterShape, EngineLayout, TrainerLayout
from miles.errors import ConfigError

logger = logging.getLogger(__name__)

GROUPS = ("ep", "tp", "engine")
"""Group kinds `crossing_share` and `Placement.groups` know."""

Gpu = tuple[int, int]
"""(node index, local GPU index)."""


@dataclass(frozen=True)
class Placement:
    """Nodes of each het group, their --segment values, and the GPU of every trainer rank and engine."""

    cluster: ClusterShape
    """The cluster planned on."""
    trainer: TrainerLayout
    """The trainer's layout."""
    engines: tuple[EngineLayout, ...]
    """The rollout engines' shapes, in het group 0's order."""
    rollout_nodes: tuple[int, ...]
    """Node indices of het group 0 (rollout), in the order its GPUs are filled."""
    train_nodes: tuple[int, ...]
    """Node indices of het group 1 (trainer), in rank order."""
    rollout_segment: int | None
    """sbatch --segment for het group 0; None = pass none."""
    train_segment: int | None
    """sbatch --segment for het group 1; None = pass none."""
    rank_map: tuple[Gpu, ...]
    """Trainer global rank -> (node index, local GPU)."""
    engine_map: tuple[tuple[Gpu, ...], ...]
    """Engine index (shape after shape) -> its GPUs, in the engine's own rank order."""
    explanations: tuple[str, ...] = ()
    """Why some group crosses a domain, why a segment is missing, or why the packing order is not largest-first;
    empty when everything fits."""

    def groups(self, kind: str) -> tuple[tuple[Gpu, ...], ...]:
        """GPUs of each trainer EP group ("ep"), trainer TP group ("tp") or rollout engine ("engine")."""
        if kind == "engine":
            return self.engine_map
        if kind == "ep":
            return tuple(tuple(self.rank_map[r] for r in g) for g in self.trainer.ep_groups())
        if kind == "tp":
            return tuple(tuple(self.rank_map[r] for r in g) for g in self.trainer.tp_groups())
        raise ValueError(f"group kind {kind!r} is not one of {GROUPS}")

    def domains_spanned(self, kind: str) -> tuple[int, ...]:
        """Number of domains each group of `kind` spans."""
        dom = self.cluster.domain_of_node
        return tuple(len({dom[node] for node, _ in g}) for g in self.groups(kind))


def _pairs(gpus_per_domain) -> tuple[int, int]:
    """(GPU pairs in different domains, all GPU pairs) of one group, from its GPU count in each domain."""
    n = sum(gpus_per_domain)
    return (n * n - sum(c * c for c in gpus_per_domain)) // 2, n * (n - 1) // 2


def _crossing_pairs(groups, dom: Sequence[int]) -> tuple[int, int]:
    """`_pairs` summed over `groups` (each a sequence of (node, GPU))."""
    crossing = total = 0
    for g in groups:
        counts: dict[int, int] = {}
        for node, _ in g:
            counts[dom[node]] = counts.get(dom[node], 0) + 1
        c, t = _pairs(counts.values())
        crossing, total = crossing + c, total + t
    return crossing, total


def crossing_share(placement: Placement, group: str = "ep") -> float:
    """Share of the all-to-all traffic of `group` groups that crosses domains.

    Every pair of distinct GPUs in one group is assumed to exchange the same bytes (uniform
    all-to-all), so the share is (pairs in different domains) / (all pairs); 0.0 when no group has
    two GPUs.
    """
    crossing, total = _crossing_pairs(placement.groups(group), placement.cluster.domain_of_node)
    return crossing / total if total else 0.0


@dataclass(frozen=True)
class _Chunk:
    group: int
    """0 = rollout, 1 = trainer."""
    part: int
    """Engine shape index (rollout) or 0 (trainer)."""
    index: int
    """Position of the chunk in its part's rank order."""
    size: int
    """Nodes."""


def _chunk_nodes(atom_gpus: int, gpus_per_node: int) -> int:
    """Fewest whole nodes that hold a whole number of atoms."""
    return atom_gpus // math.gcd(atom_gpus, gpus_per_node)


def _parts(cluster: ClusterShape, trainer: TrainerLayout, engines: tuple[EngineLayout, ...]):
    """(group, part, nodes, chunk nodes, atom GPUs, what the atom is) of each engine shape and the trainer."""
    gpn = cluster.gpus_per_node
    parts = []
    for i, e in enumerate(engines):
        if e.tp % gpn and gpn % e.tp:
            raise ConfigError(f"engine tp={e.tp} must divide gpus_per_node={gpn} or be a multiple of it")
        parts.append((0, i, -(-e.tp * e.num_engines // gpn), _chunk_nodes(e.tp, gpn), e.tp,
                      f"rollout engine of {e.tp} GPUs (tp={e.tp}, ep={e.ep}, dp={e.dp})"))
    t, atom = trainer, trainer.atom_size
    what = (f"trainer EP group of {t.ep * t.etp} GPUs (ep={t.ep} x etp={t.etp})" if atom == t.ep * t.etp
            else f"trainer TP group of {t.tp} GPUs" if atom == t.tp
            else f"trainer TP x EP block of lcm(tp={t.tp}, ep*etp={t.ep * t.etp}) = {atom} GPUs")
    parts.append((1, 0, -(-t.world_size // gpn), _chunk_nodes(atom, gpn), atom, what))
    return parts


def _pack(order: Sequence[_Chunk], cluster: ClusterShape) -> dict[_Chunk, tuple[int, ...]]:
    """Nodes of each chunk, packed in `order`: best fit (least free room that holds it whole, lowest domain on
    ties), else split over the domains with the most free nodes first. Domains are kept in heaps by free count,
    so a chunk costs O(largest domain + log domains), not O(domains)."""
    free = [list(nodes) for nodes in cluster.domains]
    used, count = [0] * len(free), [len(nodes) for nodes in free]
    heaps: list[list[int]] = [[] for _ in range(max(count) + 1)]
    for d, c in enumerate(count):
        heaps[c].append(d)  # ascending domain index: already a heap

    def first(c: int) -> int | None:  # lowest domain with exactly c free nodes (entries go stale as counts drop)
        h = heaps[c]
        while h and count[h[0]] != c:
            heapq.heappop(h)
        return h[0] if h else None

    def take(d: int, n: int) -> list[int]:
        nodes = free[d][used[d]:used[d] + n]
        used[d], count[d] = used[d] + n, count[d] - n
        heapq.heappush(heaps[count[d]], d)
        return nodes

    out = {}
    for chunk in order:
        d = next((d for c in range(chunk.size, len(heaps)) if (d := first(c)) is not None), None)
        if d is not None:
            out[chunk] = tuple(take(d, chunk.size))
            continue
        taken: list[int] = []
        for c in range(len(heaps) - 1, 0, -1):
            while len(taken) < chunk.size and (d := first(c)) is not None:
                taken += take(d, min(c, chunk.size - len(taken)))
        assert len(taken) == chunk.size, "the node count was checked before packing"
        out[chunk] = tuple(taken)
    return out


def _ordered_part_nodes(parts, chunks: Sequence[_Chunk], packed: dict[_Chunk, tuple[int, ...]]) -> dict:
    """Each part's node list: full chunks ordered by node (interchangeable, so ranks follow the nodes), then a
    short last chunk, which holds the last ranks."""
    part_nodes = {}
    for group, part, _, _, _, _ in parts:
        mine = [c for c in chunks if (c.group, c.part) == (group, part)]
        full = sorted(mine[:-1] if mine[-1].size < mine[0].size else mine, key=lambda c: packed[c])
        part_nodes[(group, part)] = [n for c in full + mine[len(full):] for n in packed[c]]
    return part_nodes


def _naive_part_nodes(parts) -> dict:
    """Node order: each part on the next consecutive nodes, rollout shapes first, the trainer last."""
    part_nodes, start = {}, 0
    for group, part, nodes, _, _, _ in parts:
        part_nodes[(group, part)] = list(range(start, start + nodes))
        start += nodes
    return part_nodes


def _segment(nodes: int, chunk: int, cluster: ClusterShape) -> int | None:
    """--segment of a group of `nodes` nodes made of `chunk`-node chunks; None when none is valid."""
    dmax = cluster.max_domain_nodes
    if dmax == 1:
        return None
    sizes = [len(d) for d in cluster.domains]
    candidates = [s for s in range(chunk, min(nodes, dmax) + 1, chunk) if nodes % s == 0]
    dividing = [s for s in candidates if all(size % s == 0 for size in sizes if size >= s)]
    return (dividing or candidates or [None])[0]


def _explain(parts, part_nodes: dict, cluster: ClusterShape, segments, packed: bool) -> list[str]:
    """One line per constraint that failed, with its numbers; `packed` = False for node order."""
    gpn, dmax, dom = cluster.gpus_per_node, cluster.max_domain_nodes, cluster.domain_of_node
    domain = f"{cluster.fabric} domain of {dmax * gpn} GPUs ({dmax} nodes x {gpn} GPUs)"
    lines = []
    for group, part, _, chunk_nodes, atom, what in parts:
        nodes = part_nodes[(group, part)]
        slices = [nodes[s:s + chunk_nodes] for s in range(0, len(nodes), chunk_nodes)]
        crossing = sum(1 for s in slices if len({dom[n] for n in s}) > 1)
        if not crossing:
            continue
        if atom > dmax * gpn:
            lines.append(f"{what} > {domain}: each spans at least {-(-atom // (dmax * gpn))} domains")
        elif chunk_nodes > dmax:
            lines.append(f"{what} does not tile whole nodes of {gpn} GPUs: the fewest nodes holding whole groups "
                         f"({chunk_nodes}) exceed the {domain}")
        else:
            why = (f"the free room left in the domains ({cluster.num_nodes} nodes in {len(cluster.domains)} domains "
                   f"of up to {dmax} nodes) cannot hold them whole" if packed
                   else "node order is kept (see the line on packing)")
            lines.append(f"{what}: {crossing} of {len(slices)} chunks of {chunk_nodes} nodes cross a domain "
                         f"boundary: {why}")
    for name, (nodes, chunk, seg) in segments.items():
        if seg is None and dmax > 1:
            lines.append(f"no --segment for the {name} group: no multiple of its {chunk}-node chunk both divides its "
                         f"{nodes} nodes and fits the {domain}")
        elif seg is not None and any(len(d) % seg for d in cluster.domains if len(d) >= seg):
            lines.append(f"--segment={seg} of the {name} group does not divide the {dmax}-node domain: "
                         f"{dmax % seg} nodes of each domain are left to other groups or jobs")
    return lines


def _fill(nodes: Sequence[int], num_gpus: int, gpus_per_node: int) -> list[Gpu]:
    """The first num_gpus GPUs of `nodes`, node by node."""
    return [(nodes[i // gpus_per_node], i % gpus_per_node) for i in range(num_gpus)]


def _assemble(cluster, trainer, engines, part_nodes: dict, segments, explanations) -> Placement:
    """Build the Placement from each part's ordered node list."""
    gpn = cluster.gpus_per_node
    rollout, engine_map = [], []
    for i, e in enumerate(engines):
        nodes = part_nodes[(0, i)]
        rollout += nodes
        gpus = _fill(nodes, e.tp * e.num_engines, gpn)
        engine_map += [tuple(gpus[k * e.tp:(k + 1) * e.tp]) for k in range(e.num_engines)]
    train = part_nodes[(1, 0)]
    return Placement(cluster=cluster, trainer=trainer, engines=engines, rollout_nodes=tuple(rollout),
                     train_nodes=tuple(train), rollout_segment=segments.get("rollout", (0, 0, None))[2],
                     train_segment=segments["trainer"][2],
                     rank_map=tuple(_fill(train, trainer.world_size, gpn)), engine_map=tuple(engine_map),
                     explanations=tuple(explanations))


def _scorer(cluster: ClusterShape, trainer: TrainerLayout, engines: tuple[EngineLayout, ...]):
    """part nodes -> {key: (crossing, all) GPU pairs} of each part's groups: ("ep",) and ("tp",) for the trainer,
    ("engine", i) per engine shape. The same numbers as `crossing_share`, counted per node (a node's GPUs share
    its domain), so a candidate plan is scored without building its Placement."""
    dom, gpn = cluster.domain_of_node, cluster.gpus_per_node

    def per_node(groups):  # each group as ((position in its part's node list, GPUs there), ...)
        out = []
        for g in groups:
            weight: dict[int, int] = {}
            for gpu in g:
                weight[gpu // gpn] = weight.get(gpu // gpn, 0) + 1
            out.append(tuple(weight.items()))
        return out

    keyed = {("ep",): ((1, 0), per_node(trainer.ep_groups())), ("tp",): ((1, 0), per_node(trainer.tp_groups()))}
    for i, e in enumerate(engines):
        keyed[("engine", i)] = ((0, i), per_node(range(k * e.tp, (k + 1) * e.tp) for k in range(e.num_engines)))

    def score(part_nodes: dict) -> dict[tuple, tuple[int, int]]:
        out = {}
        for key, (part, groups) in keyed.items():
            nodes, crossing, total = part_nodes[part], 0, 0
            for g in groups:
                counts: dict[int, int] = {}
                for position, n in g:
                    d = dom[nodes[position]]
                    counts[d] = counts.get(d, 0) + n
                c, t = _pairs(counts.values())
                crossing, total = crossing + c, total + t
            out[key] = (crossing, total)
        return out
    return score


def _score_line(engines, mine: dict, naive: dict) -> str:
    """'trainer EP 12.9% (node order 14.3%), ...' for every part with pairs."""
    def label(key):
        if key[0] != "engine":
            return f"trainer {key[0].upper()}"
        return f"engines of {engines[key[1]].tp} GPUs" + (f" (shape {key[1]})" if len(engines) > 1 else "")
    return ", ".join(f"{label(k)} {mine[k][0] / mine[k][1]:.1%} (node order {naive[k][0] / naive[k][1]:.1%})"
                     for k in mine if mine[k][1])


def _check_fits(cluster: ClusterShape, parts) -> None:
    needed = sum(p[2] for p in parts)
    if needed > cluster.num_nodes:
        raise ConfigError(f"the rollout and trainer groups need {needed} nodes of {cluster.gpus_per_node} GPUs, "
                          f"the cluster has {cluster.num_nodes}")


def _choose(parts, chunks, cluster, engines, score) -> tuple[dict, bool, str | None]:
    """(part nodes, packed?, note) of the chosen plan (module doc, "Which order"); `score` from `_scorer`."""
    def attempt(order):
        part_nodes = _ordered_part_nodes(parts, chunks, _pack(order, cluster))
        return part_nodes, score(part_nodes)

    default_order = sorted(chunks, key=lambda c: (-c.size, c.group, c.part, c.index))
    default = attempt(default_order)
    if not any(crossing for crossing, _ in default[1].values()):
        return default[0], True, None
    naive_nodes = _naive_part_nodes(parts)
    naive = score(naive_nodes)
    within = lambda scores, keys: all(scores[k][0] <= naive[k][0] for k in keys)  # noqa: E731
    if within(default[1], naive):
        return default[0], True, None
    tried = [(default, None)]
    for group, part, *_ in parts:
        keys = [("ep",), ("tp",)] if group else [("engine", part)]
        if within(default[1], keys):
            continue
        mine = [c for c in default_order if (c.group, c.part) == (group, part)]
        others = [c for c in default_order if (c.group, c.part) != (group, part)]
        at = lambda m: attempt(others[:m] + mine + others[m:])  # noqa: E731 - this part packed before others[m]
        lo, hi = 0, len(others)
        first = at(0)
        tried.append((first, (group, part, 0, len(others))))
        if not within(first[1], keys):
            continue  # even packed first, this part crosses more pairs than in node order
        while hi - lo > 1:  # packed before others[lo] this part is within node order; before others[hi] it is not
            mid = (lo + hi) // 2
            trial = at(mid)
            tried.append((trial, (group, part, mid, len(others))))
            lo, hi = (mid, hi) if within(trial[1], keys) else (lo, mid)
    kept = [(sum(c for c, _ in scores.values()), i, nodes, scores, how)
            for i, ((nodes, scores), how) in enumerate(tried) if within(scores, naive)]
    default_line = _score_line(engines, default[1], naive)
    if not kept:
        return naive_nodes, False, (f"every packing tried crosses more GPU pairs than node order for some group "
                                    f"(largest-first: {default_line}): node order is kept")
    _, _, nodes, scores, (group, part, m, n) = min(kept, key=lambda k: k[:2])
    name = "trainer" if group else f"rollout engine shape {part}"
    where = f"after {m} of the {n} other chunks" if m else "first"
    return nodes, True, (f"largest-first packing crosses more GPU pairs than node order ({default_line}): the "
                         f"{name}'s chunks were packed {where} instead: {_score_line(engines, scores, naive)}")


def plan_placement(cluster: ClusterShape, trainer: TrainerLayout,
                   engines: EngineLayout | Sequence[EngineLayout] = ()) -> Placement:
    """Plan the het job: nodes per group, --segment values, rank map and engine map (see the module doc).

    No part's groups (trainer EP, trainer TP, each engine shape) cross more GPU pairs than in
    `naive_placement`. Raises ConfigError when the groups need more nodes than the cluster has, or an
    engine's tp neither divides nor is a multiple of gpus_per_node.
    """
    engines = (engines,) if isinstance(engines, EngineLayout) else tuple(engines)
    parts = _parts(cluster, trainer, engines)
    _check_fits(cluster, parts)
    chunks = [_Chunk(group, part, k, min(chunk_nodes, nodes - start))
              for group, part, nodes, chunk_nodes, _, _ in parts
              for k, start in enumerate(range(0, nodes, chunk_nodes))]
    rollout_nodes = sum(p[2] for p in parts if p[0] == 0)
    rollout_chunk = math.lcm(*[p[3] for p in parts if p[0] == 0]) if engines else 0
    segments = {"trainer": (parts[-1][2], parts[-1][3], _segment(parts[-1][2], parts[-1][3], cluster))}
    if engines:
        segments = {"rollout": (rollout_nodes, rollout_chunk, _segment(rollout_nodes, rollout_chunk, cluster)),
                    **segments}
    part_nodes, packed, note = _choose(parts, chunks, cluster, engines, _scorer(cluster, trainer, engines))
    explanations = _explain(parts, part_nodes, cluster, segments, packed) + ([note] if note else [])
    for line in explanations:
        logger.info("placement: %s", line)
    return _assemble(cluster, trainer, engines, part_nodes, segments, explanations)


def naive_placement(cluster: ClusterShape, trainer: TrainerLayout,
                    engines: EngineLayout | Sequence[EngineLayout] = ()) -> Placement:
    """The order that ignores domains: rollout GPUs on the first nodes, node by node, the trainer right after."""
    engines = (engines,) if isinstance(engines, EngineLayout) else tuple(engines)
    parts = _parts(cluster, trainer, engines)
    _check_fits(cluster, parts)
    return _assemble(cluster, trainer, engines, _naive_part_nodes(parts), {"trainer": (0, 0, None)}, [])
