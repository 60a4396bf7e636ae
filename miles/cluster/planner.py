"""The topology planner: which nodes each het group gets, its --segment, and where every rank runs.

    placement = plan_placement(ClusterShape(1152, 4, domain_nodes=18), TrainerLayout(tp=4, pp=4, cp=2, ep=32, dp=72),
                               (EngineLayout(tp=64, ep=64, dp=64, num_engines=36),))
    placement.rank_map[r]          # trainer rank r -> (node index, local GPU)
    placement.train_segment        # sbatch --segment of het group 1 (None: do not pass one)
    crossing_share(placement, "ep")                 # 0.0: every EP all-to-all stays in its NVLink domain
    crossing_share(naive_placement(...), "ep")      # what node-by-node order would give

Pure and deterministic: the same inputs give the same Placement, nothing is read from the machine.

How it plans. Each group's GPUs are filled node by node in its node order (het group 0 = the
rollout engines, shape after shape; het group 1 = the trainer ranks), so what the planner chooses
is which nodes, in which order. A *chunk* is the fewest whole nodes that hold a whole number of
atoms, where an atom is what must stay inside one domain: an engine (tp GPUs), or for the trainer
lcm(tp, ep * etp) consecutive ranks, which are whole TP groups and whole EP groups (the layout's
module doc gives the rank order). Chunks of both groups, largest first, go best-fit into the domain
with the least free room that still holds them whole, so domains are filled before new ones are
opened; a chunk that no domain can hold whole is split over the fewest domains (those with the most
free nodes first), and `Placement.explanations` says which constraint failed, with the numbers.

--segment of a group = the smallest multiple of its chunk that divides the group's node count
(Slurm requires that) and fits in a domain, preferring one that also divides the domain size (so
no block is left with unusable nodes); None when no such size exists or domains are single nodes.
"""

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
    """Why some group crosses a domain, or why a segment is missing; empty when everything fits."""

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


def crossing_share(placement: Placement, group: str = "ep") -> float:
    """Share of the all-to-all traffic of `group` groups that crosses domains.

    Every pair of distinct GPUs in one group is assumed to exchange the same bytes (uniform
    all-to-all), so the share is (pairs in different domains) / (all pairs); 0.0 when no group has
    two GPUs.
    """
    dom = placement.cluster.domain_of_node
    crossing = total = 0
    for g in placement.groups(group):
        counts: dict[int, int] = {}
        for node, _ in g:
            counts[dom[node]] = counts.get(dom[node], 0) + 1
        n = len(g)
        total += n * (n - 1) // 2
        crossing += (n * n - sum(c * c for c in counts.values())) // 2
    return crossing / total if total else 0.0


@dataclass
class _Chunk:
    group: int
    """0 = rollout, 1 = trainer."""
    part: int
    """Engine shape index (rollout) or 0 (trainer)."""
    index: int
    """Position of the chunk in its part's rank order."""
    size: int
    """Nodes."""
    nodes: tuple[int, ...] = ()
    """Assigned node indices."""


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


def _fit(chunks: list[_Chunk], cluster: ClusterShape) -> list[_Chunk]:
    """Assign nodes to chunks, largest first, best fit; returns the chunks that had to be split."""
    free = [list(nodes) for nodes in cluster.domains]
    split = []
    for chunk in sorted(chunks, key=lambda c: (-c.size, c.group, c.part, c.index)):
        fits = [d for d in range(len(free)) if len(free[d]) >= chunk.size]
        if fits:
            d = min(fits, key=lambda d: (len(free[d]), d))
            chunk.nodes, free[d] = tuple(free[d][:chunk.size]), free[d][chunk.size:]
            continue
        taken: list[int] = []
        for d in sorted(range(len(free)), key=lambda d: (-len(free[d]), d)):
            take = min(len(free[d]), chunk.size - len(taken))
            taken += free[d][:take]
            free[d] = free[d][take:]
            if len(taken) == chunk.size:
                break
        assert len(taken) == chunk.size, "the node count was checked before fitting"
        chunk.nodes = tuple(taken)
        split.append(chunk)
    return split


def _segment(nodes: int, chunk: int, cluster: ClusterShape) -> int | None:
    """--segment of a group of `nodes` nodes made of `chunk`-node chunks; None when none is valid."""
    dmax = cluster.max_domain_nodes
    if dmax == 1:
        return None
    sizes = [len(d) for d in cluster.domains]
    candidates = [s for s in range(chunk, min(nodes, dmax) + 1, chunk) if nodes % s == 0]
    dividing = [s for s in candidates if all(size % s == 0 for size in sizes if size >= s)]
    return (dividing or candidates or [None])[0]


def _explain(parts, chunks, split, cluster: ClusterShape, segments) -> list[str]:
    """One line per constraint that failed, with its numbers."""
    gpn, dmax = cluster.gpus_per_node, cluster.max_domain_nodes
    domain = f"{cluster.fabric} domain of {dmax * gpn} GPUs ({dmax} nodes x {gpn} GPUs)"
    lines = []
    for group, part, _, chunk_nodes, atom, what in parts:
        mine = [c for c in split if (c.group, c.part) == (group, part)]
        if not mine:
            continue
        if atom > dmax * gpn:
            lines.append(f"{what} > {domain}: each spans at least {-(-atom // (dmax * gpn))} domains")
        elif chunk_nodes > dmax:
            lines.append(f"{what} does not tile whole nodes of {gpn} GPUs: the fewest nodes holding whole groups "
                         f"({chunk_nodes}) exceed the {domain}")
        else:
            total = sum(1 for c in chunks if (c.group, c.part) == (group, part))
            lines.append(f"{what}: {len(mine)} of {total} chunks of {chunk_nodes} nodes cross a domain boundary: "
                         f"the free room left in the domains ({cluster.num_nodes} nodes in {len(cluster.domains)} "
                         f"domains of up to {dmax} nodes) cannot hold them whole")
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


def _check_fits(cluster: ClusterShape, parts) -> None:
    needed = sum(p[2] for p in parts)
    if needed > cluster.num_nodes:
        raise ConfigError(f"the rollout and trainer groups need {needed} nodes of {cluster.gpus_per_node} GPUs, "
                          f"the cluster has {cluster.num_nodes}")


def plan_placement(cluster: ClusterShape, trainer: TrainerLayout,
                   engines: EngineLayout | Sequence[EngineLayout] = ()) -> Placement:
    """Plan the het job: nodes per group, --segment values, rank map and engine map (see the module doc).

    Raises ConfigError when the groups need more nodes than the cluster has, or an engine's tp neither
    divides nor is a multiple of gpus_per_node.
    """
    engines = (engines,) if isinstance(engines, EngineLayout) else tuple(engines)
    parts = _parts(cluster, trainer, engines)
    _check_fits(cluster, parts)
    chunks = []
    for group, part, nodes, chunk_nodes, _, _ in parts:
        chunks += [_Chunk(group, part, k, min(chunk_nodes, nodes - start))
                   for k, start in enumerate(range(0, nodes, chunk_nodes))]
    split = _fit(chunks, cluster)
    part_nodes = {}
    for group, part, _, _, _, _ in parts:
        mine = [c for c in chunks if (c.group, c.part) == (group, part)]
        # Full chunks are interchangeable: order them by node so ranks follow the nodes; a short last
        # chunk holds the last ranks and stays last.
        full = sorted(mine[:-1] if mine[-1].size < mine[0].size else mine, key=lambda c: c.nodes)
        rest = mine[len(full):]
        part_nodes[(group, part)] = [n for c in full + rest for n in c.nodes]
    rollout_nodes = sum(p[2] for p in parts if p[0] == 0)
    rollout_chunk = math.lcm(*[p[3] for p in parts if p[0] == 0]) if engines else 0
    segments = {"trainer": (parts[-1][2], parts[-1][3], _segment(parts[-1][2], parts[-1][3], cluster))}
    if engines:
        segments = {"rollout": (rollout_nodes, rollout_chunk, _segment(rollout_nodes, rollout_chunk, cluster)),
                    **segments}
    explanations = _explain(parts, chunks, split, cluster, segments)
    for line in explanations:
        logger.info("placement: %s", line)
    return _assemble(cluster, trainer, engines, part_nodes, segments, explanations)


def naive_placement(cluster: ClusterShape, trainer: TrainerLayout,
                    engines: EngineLayout | Sequence[EngineLayout] = ()) -> Placement:
    """The order that ignores domains: rollout GPUs on the first nodes, node by node, the trainer right after."""
    engines = (engines,) if isinstance(engines, EngineLayout) else tuple(engines)
    parts = _parts(cluster, trainer, engines)
    _check_fits(cluster, parts)
    part_nodes, start = {}, 0
    for group, part, nodes, _, _, _ in parts:
        part_nodes[(group, part)] = list(range(start, start + nodes))
        start += nodes
    segments = {"trainer": (0, 0, None)}
    return _assemble(cluster, trainer, engines, part_nodes, segments, [])
