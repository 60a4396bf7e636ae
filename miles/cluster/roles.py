"""Who runs where in a Miles het job: the layout of the two groups, each task's role, and the ports.

    het-group 0 "rollout": engine tasks (one per engine, or one per node of a multi-node engine),
                           plus the router as an overlapping step on the group's first node
    het-group 1 "train"  : one trainer rank per GPU (rank 0 is also the controller)

Ports come from the job id, so every task computes the same numbers without talking to anyone:
each job owns a block of PORTS_PER_JOB ports in [PORT_LO, PORT_HI), below Linux's ephemeral range
(32768+), chosen by job id. Offsets inside the block are fixed per role, so roles never collide,
even when all virtual nodes share one address (the dev cluster). Two jobs collide only if their
ids are equal modulo the number of blocks (312) AND they share a node.
"""

import math
from dataclasses import dataclass

from miles.errors import ConfigError

PORT_LO, PORT_HI = 10000, 30000
PORTS_PER_JOB = 64
NUM_PORT_BLOCKS = (PORT_HI - PORT_LO) // PORTS_PER_JOB
ENGINE_PORT_OFFSET = 8
MAX_ENGINE_TASKS_PER_NODE = (PORTS_PER_JOB - ENGINE_PORT_OFFSET) // 2
GROUP_NAMES = {0: "rollout", 1: "train"}
ROLE_KINDS = ("engine", "router", "trainer")


@dataclass(frozen=True)
class JobPorts:
    """The port block of one job."""

    base: int
    """First port of the block."""

    @classmethod
    def for_job(cls, job_id: int) -> "JobPorts":
        return cls(PORT_LO + (job_id % NUM_PORT_BLOCKS) * PORTS_PER_JOB)

    @property
    def master(self) -> int:
        """torch.distributed rendezvous (MASTER_PORT) of the trainer ranks, on the first train node."""
        return self.base

    @property
    def router(self) -> int:
        """The router's HTTP port, on the first rollout node."""
        return self.base + 1

    def engine_http(self, local_index: int) -> int:
        """HTTP port of the engine task with SLURM_LOCALID local_index on its node."""
        self._check_local(local_index)
        return self.base + ENGINE_PORT_OFFSET + 2 * local_index

    def engine_dist(self, local_index: int) -> int:
        """Port a multi-node engine's first task opens for its other nodes (SGLang --dist-init-addr)."""
        self._check_local(local_index)
        return self.base + ENGINE_PORT_OFFSET + 2 * local_index + 1

    @staticmethod
    def _check_local(local_index: int) -> None:
        if not 0 <= local_index < MAX_ENGINE_TASKS_PER_NODE:
            raise ConfigError(f"engine task {local_index} on one node: at most {MAX_ENGINE_TASKS_PER_NODE} "
                              f"engine tasks fit a node's port block")


@dataclass(frozen=True)
class HetLayout:
    """Task counts of the two het-job groups, derived from the config's cluster and engine sections."""

    nodes_rollout: int
    """Nodes of group 0."""
    nodes_train: int
    """Nodes of group 1."""
    gpus_per_node: int
    """GPUs per node (0 = CPU-only job)."""
    num_engines: int
    """Engines (inference servers)."""
    gpus_per_engine: int
    """GPUs of one engine (0 in a CPU-only job)."""
    nodes_per_engine: int
    """Nodes one engine spans (1 unless gpus_per_engine > gpus_per_node)."""
    engine_tasks_per_node: int
    """Engine tasks on each rollout node."""
    trainers_per_node: int
    """Trainer ranks on each train node."""

    @classmethod
    def from_config(cls, cfg) -> "HetLayout":
        """The layout of cfg (a RunConfig); ConfigError when the engines do not fit the rollout nodes."""
        c, num_engines = cfg.cluster, cfg.engine.num_engines
        gpn = c.gpus_per_node
        gpe = c.gpus_per_engine if gpn else 0
        nodes_per_engine = max(1, gpe // gpn) if gpn else 1
        if nodes_per_engine > 1:
            if cfg.engine.kind != "sglang":
                raise ConfigError(f"cluster.gpus_per_engine={gpe} > cluster.gpus_per_node={gpn} makes a multi-node "
                                  f"engine, which only engine.kind=sglang supports (got {cfg.engine.kind!r})")
            per_node, needed_nodes = 1, num_engines * nodes_per_engine
        else:
            per_node = gpn // gpe if gpn else math.ceil(num_engines / c.nodes_rollout)
            needed_nodes = math.ceil(num_engines / per_node)
        if needed_nodes > c.nodes_rollout:
            raise ConfigError(
                f"{num_engines} engine(s) of {gpe or 'no'} GPUs need {needed_nodes} rollout node(s) of "
                f"{gpn} GPUs, but cluster.nodes_rollout={c.nodes_rollout}; raise it or lower engine.num_engines")
        per_node = min(per_node, num_engines * nodes_per_engine)
        if per_node > MAX_ENGINE_TASKS_PER_NODE:
            raise ConfigError(f"{per_node} engine tasks per node; at most {MAX_ENGINE_TASKS_PER_NODE} are supported")
        return cls(
            nodes_rollout=c.nodes_rollout, nodes_train=c.nodes_train, gpus_per_node=gpn, num_engines=num_engines,
            gpus_per_engine=gpe, nodes_per_engine=nodes_per_engine, engine_tasks_per_node=per_node,
            trainers_per_node=c.trainers_per_node or max(gpn, 1),
        )

    @property
    def engine_tasks(self) -> int:
        """Tasks of the engine step."""
        return self.num_engines * self.nodes_per_engine

    @property
    def train_tasks(self) -> int:
        """Trainer ranks (torch.distributed world size)."""
        return self.nodes_train * self.trainers_per_node

    @property
    def engine_gpus_per_task(self) -> int:
        """srun --gpus-per-task of the engine step; 0 = none (CPU job, or a multi-node engine using its node's GPUs)."""
        return self.gpus_per_engine if self.gpus_per_engine and self.nodes_per_engine == 1 else 0


@dataclass(frozen=True)
class Role:
    """One task of the het job."""

    kind: str
    """"engine", "router" or "trainer"."""
    rank: int
    """SLURM_PROCID inside the role's step (engine task, trainer rank; 0 for the router)."""
    restart: int
    """SLURM_RESTART_COUNT of the job."""

    def __post_init__(self) -> None:
        assert self.kind in ROLE_KINDS, self.kind

    @property
    def group(self) -> int:
        """Het group: 0 for engines and the router, 1 for trainers."""
        return 1 if self.kind == "trainer" else 0

    @property
    def group_name(self) -> str:
        return GROUP_NAMES[self.group]

    @property
    def log_name(self) -> str:
        """`<group>-<rank>` (`rollout-router` for the router), the stem of the role's log file."""
        return f"{self.group_name}-{'router' if self.kind == 'router' else self.rank}"

    @property
    def label(self) -> str:
        """What error messages call this task, e.g. "het-group 1 (train) rank 1"."""
        what = "router" if self.kind == "router" else f"rank {self.rank}"
        return f"het-group {self.group} ({self.group_name}) {what}"

    def log_file(self, restart: int | None = None) -> str:
        """Name of the role's log file in run_dir/logs."""
        return f"{self.log_name}.r{self.restart if restart is None else restart}.log"


@dataclass(frozen=True)
class EngineTask:
    """Which engine an engine-step task serves, and which of its nodes it is."""

    index: int
    """Engine number, 0..num_engines-1."""
    node_rank: int
    """Node of the engine this task runs (0 serves HTTP and publishes the address)."""

    @classmethod
    def from_procid(cls, procid: int, layout: HetLayout) -> "EngineTask":
        if not 0 <= procid < layout.engine_tasks:
            raise ConfigError(f"engine task {procid} does not exist: the layout has {layout.engine_tasks} engine tasks")
        return cls(index=procid // layout.nodes_per_engine, node_rank=procid % layout.nodes_per_engine)
