"""The shapes the topology planner works on: the cluster's fast-fabric domains and the parallel layouts.

    cluster = ClusterShape(num_nodes=1152, gpus_per_node=4, domain_nodes=18)      # 64 NVL72 racks
    trainer = TrainerLayout(tp=4, pp=4, cp=2, ep=32, dp=4)                         # GLM-5's layout
    engines = (EngineLayout(tp=64, ep=64, dp=64, num_engines=1),)
    trainer.ep_groups()[0]   # (0, 1, ..., 31): the ranks of one expert all-to-all

A *domain* is a set of nodes whose GPUs talk over the fast fabric: an NVLink domain of 18 nodes x 4
GPUs on GB200/GB300 NVL72 (a Slurm `topology/block` block), one node of 8 GPUs on MI355X (xGMI) or
H100/H200 (NVLink inside the node). Node indices are positions in `ClusterShape.node_names`.

Trainer rank order is Megatron-core's default order "tp-cp-ep-dp-pp" (`initialize_model_parallel`):
TP fastest, then CP, then DP, then PP, world = tp * cp * dp * pp. The expert layers reuse the same
ranks with their own generator: ETP fastest, then EP, then expert-DP, then PP, so inside each
pipeline stage (tp * cp * dp consecutive ranks) an EP group is `ep` ranks with stride `etp`, and
it is drawn from the stage's TP x CP x DP ranks (ep * etp must divide tp * cp * dp). With etp = 1
(GLM-5, DeepSeek-V3) an EP group is `ep` consecutive ranks. `tests/unit/cluster/test_planner.py`
checks these groups against megatron-core's own RankGenerator.

A rollout engine follows SGLang: --tp-size is its GPU count; with --enable-dp-attention, --dp-size
splits attention and --ep-size the experts over those same GPUs, so ep and dp divide tp.
"""

import math
from dataclasses import dataclass, field

from miles.errors import ConfigError


@dataclass(frozen=True)
class ClusterShape:
    """Nodes, GPUs per node and the fast-fabric domains (uniform `domain_nodes` or explicit `blocks`)."""

    num_nodes: int
    """Nodes in the cluster (or the part of it the job may use)."""
    gpus_per_node: int
    """GPUs of one node (4 on GB200/GB300, 8 on H100/H200/MI355X)."""
    domain_nodes: int = 0
    """Nodes per domain, cut in node order (18 for NVL72, 1 for MI355X); the last domain may be
    smaller. 0 = the domains are given by `blocks`."""
    blocks: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    """Node names of each domain, as Slurm's topology.conf `BlockName=... Nodes=...` lists them; their
    concatenation is the node order. Empty = nodes named node0000, node0001, ... cut by domain_nodes."""
    fabric: str = "NVLink"
    """Name of the domain's fabric, used in explanations ("NVLink", "xGMI")."""

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"a cluster needs >= 1 node and >= 1 GPU per node, got num_nodes={self.num_nodes}, "
                              f"gpus_per_node={self.gpus_per_node}")
        if bool(self.domain_nodes) == bool(self.blocks):
            raise ConfigError("give the domains either as domain_nodes (> 0) or as blocks, exactly one of them")
        if self.domain_nodes < 0:
            raise ConfigError(f"domain_nodes must be >= 0, got {self.domain_nodes}")
        if self.blocks:
            names = [name for block in self.blocks for name in block]
            if any(not block for block in self.blocks):
                raise ConfigError("every block must name at least one node")
            if len(names) != self.num_nodes:
                raise ConfigError(f"the blocks name {len(names)} nodes but num_nodes={self.num_nodes}")
            if len(set(names)) != len(names):
                raise ConfigError("a node is named in more than one block (or twice in one)")

    @property
    def num_gpus(self) -> int:
        """GPUs in the cluster."""
        return self.num_nodes * self.gpus_per_node

    @property
    def node_names(self) -> tuple[str, ...]:
        """Name of each node, indexed by node index."""
        if self.blocks:
            return tuple(name for block in self.blocks for name in block)
        return tuple(f"node{i:04d}" for i in range(self.num_nodes))

    @property
    def domains(self) -> tuple[tuple[int, ...], ...]:
        """Node indices of each domain, in node order."""
        if self.blocks:
            out, start = [], 0
            for block in self.blocks:
                out.append(tuple(range(start, start + len(block))))
                start += len(block)
            return tuple(out)
        step = self.domain_nodes
        return tuple(tuple(range(s, min(s + step, self.num_nodes))) for s in range(0, self.num_nodes, step))

    @property
    def domain_of_node(self) -> tuple[int, ...]:
        """Domain index of each node."""
        out = [0] * self.num_nodes
        for d, nodes in enumerate(self.domains):
            for n in nodes:
                out[n] = d
        return tuple(out)

    @property
    def max_domain_nodes(self) -> int:
        """Nodes of the largest domain."""
        return max(len(nodes) for nodes in self.domains)


@dataclass(frozen=True)
class TrainerLayout:
    """Megatron-core parallel sizes of the trainer (rank order "tp-cp-ep-dp-pp", see the module doc)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    ep: int = 1
    """Expert-parallel size (ranks drawn from each stage's tp * cp * dp ranks)."""
    dp: int = 1
    """Data-parallel size of the dense layers."""
    etp: int = 1
    """Expert tensor-parallel size (megatron-core's expert_tensor_parallel_size; our plan's default is 1)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "dp", "etp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer {name} must be >= 1, got {getattr(self, name)}")
        if self.stage_size % (self.ep * self.etp):
            raise ConfigError(f"ep * etp = {self.ep} * {self.etp} must divide tp * cp * dp = {self.stage_size} "
                              f"(expert-parallel ranks are drawn from each pipeline stage)")

    @property
    def world_size(self) -> int:
        """Trainer ranks: tp * cp * dp * pp."""
        return self.stage_size * self.pp

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline stage: tp * cp * dp, consecutive in rank order."""
        return self.tp * self.cp * self.dp

    @property
    def atom_size(self) -> int:
        """Consecutive ranks that hold whole TP groups and whole EP groups: lcm(tp, ep * etp)."""
        return math.lcm(self.tp, self.ep * self.etp)

    def tp_groups(self) -> tuple[tuple[int, ...], ...]:
        """Ranks of each tensor-parallel group (tp consecutive ranks)."""
        return tuple(tuple(range(s, s + self.tp)) for s in range(0, self.world_size, self.tp))

    def ep_groups(self) -> tuple[tuple[int, ...], ...]:
        """Ranks of each expert-parallel group, in megatron-core's order (stride etp inside ep * etp ranks)."""
        span = self.ep * self.etp
        return tuple(tuple(base + offset + self.etp * j for j in range(self.ep))
                     for base in range(0, self.world_size, span) for offset in range(self.etp))

    @classmethod
    def from_plan(cls, plan, tp: int, world_size: int) -> "TrainerLayout":
        """The layout a recipe plans: `plan` is a PlanConfig, tp the trainer's TP size, world_size its ranks."""
        per_dp = tp * plan.pipeline_parallel * plan.context_parallel
        if world_size % per_dp:
            raise ConfigError(f"{world_size} trainer ranks are not divisible by tp * pp * cp = {per_dp}")
        return cls(tp=tp, pp=plan.pipeline_parallel, cp=plan.context_parallel, ep=plan.expert_parallel,
                   dp=world_size // per_dp, etp=plan.expert_tensor_parallel)


@dataclass(frozen=True)
class EngineLayout:
    """`num_engines` SGLang engines of one shape: tp GPUs each, split by dp-attention and EP."""

    tp: int = 1
    """GPUs of one engine (SGLang --tp-size)."""
    ep: int = 1
    """Expert-parallel size inside the engine (--ep-size); divides tp."""
    dp: int = 1
    """Data-parallel attention size inside the engine (--dp-size with --enable-dp-attention); divides tp."""
    num_engines: int = 1
    """Engines of this shape."""

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "dp", "num_engines"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine {name} must be >= 1, got {getattr(self, name)}")
        for name in ("ep", "dp"):
            if self.tp % getattr(self, name):
                raise ConfigError(f"engine {name}={getattr(self, name)} must divide its tp={self.tp} (its GPU count)")
