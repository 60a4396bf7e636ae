"""Configuration of the Slurm job: the het-job layout and the sbatch options (recipe section `cluster`).

miles-submit's flags (--partition, --nodes-train, ...) are overrides of these keys, so the resolved
config in the run directory records how the job was submitted. See docs/slurm.md.
"""

from dataclasses import dataclass, field

from miles.cluster.platforms import PLATFORMS
from miles.errors import ConfigError

BOOTSTRAPS = ("env", "mpi")
RANK_ORDERS = ("topology", "slurm")


@dataclass(frozen=True)
class ClusterConfig:
    """How the run is laid out as a Slurm heterogeneous job (group 0 rollout, group 1 train)."""

    nodes_rollout: int = 1
    """Nodes of het-group 0: the engines, plus the router on its first node."""
    nodes_train: int = 1
    """Nodes of het-group 1: the trainer ranks (rank 0 is also the controller)."""
    gpus_per_node: int = 0
    """GPUs requested per node in both groups (--gpus-per-node); 0 = a CPU-only job (the quickstart)."""
    gpus_per_engine: int = 1
    """GPUs of one engine (its TP size); more than gpus_per_node makes a multi-node engine, one task
    per node. Ignored when gpus_per_node is 0."""
    trainers_per_node: int = 0
    """Trainer ranks per train node; 0 = one per GPU (or 1 in a CPU-only job)."""
    bootstrap: str = "env"
    """How trainer ranks join torch.distributed: "env" (env:// from SLURM_PROCID/NTASKS/LOCALID) or
    "mpi" (mpi4py under `srun --mpi=<srun_mpi>`; rank 0 broadcasts the master address)."""
    srun_mpi: str = "pmi2"
    """srun --mpi plugin of the trainer step when bootstrap is "mpi" (pmi2 for MPICH, pmix for Open MPI)."""
    partition: str = ""
    """Slurm partition of both groups ("" = the cluster's default partition)."""
    account: str = ""
    """Slurm account to charge ("" = your default account)."""
    qos: str = ""
    """Slurm QOS ("" = the default)."""
    time: str = ""
    """Time limit, in sbatch syntax (e.g. "04:00:00"; "" = the partition's default)."""
    constraint: str = ""
    """Node feature constraint (sbatch --constraint), e.g. "h100"."""
    exclusive: bool = False
    """Ask for whole nodes (sbatch --exclusive)."""
    container_image: str = ""
    """Run every step in this image through pyxis (srun --container-image); "" = no container."""
    apptainer_image: str = ""
    """Run every step through `apptainer exec --nv IMAGE`; "" = no Apptainer."""
    sbatch_extra: tuple[str, ...] = field(default_factory=tuple)
    """Extra sbatch options, one per item ("--mail-type=END"); written as #SBATCH lines of het-group 0,
    which carries the job-wide options."""
    rendezvous_timeout_s: float = 900.0
    """Seconds the router and the controller wait for the engines' addresses before failing."""
    platform: str = ""
    """Platform preset (gb200, gb300, h100, h200, mi355x): its sbatch/platforms/<name>.sh is sourced by the
    job, and its GPUs per node and domain size feed the planner; "" = none (docs/topology.md)."""
    domain_nodes: int = 0
    """Nodes per fast-fabric domain when run-time discovery finds none, and for --segment at submit;
    0 = the platform's (18 on gb200/gb300, else 1)."""
    rank_order: str = "topology"
    """Trainer rank order: "topology" (discover the domains, apply the planner's rank map before
    torch.distributed starts) or "slurm" (RANK = SLURM_PROCID)."""
    imex_channel_per_segment: bool = False
    """One IMEX channel per --segment instead of one per job (sbatch --network=unique-channel-per-segment;
    Slurm 25.11+, switch/nvidia_imex with topology/block); only for platforms that use IMEX."""

    def __post_init__(self) -> None:
        for name in ("nodes_rollout", "nodes_train"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "trainers_per_node"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cluster.{name} must be >= 0, got {getattr(self, name)}")
        if self.gpus_per_engine < 1:
            raise ConfigError(f"cluster.gpus_per_engine must be >= 1, got {self.gpus_per_engine}")
        gpn, gpe = self.gpus_per_node, self.gpus_per_engine
        if gpn and (gpn % gpe if gpe <= gpn else gpe % gpn):
            raise ConfigError(f"cluster.gpus_per_engine={gpe} must divide cluster.gpus_per_node={gpn} "
                              f"or be a multiple of it (a multi-node engine)")
        if self.bootstrap not in BOOTSTRAPS:
            raise ConfigError(f"cluster.bootstrap={self.bootstrap!r} is not one of {BOOTSTRAPS}")
        if self.container_image and self.apptainer_image:
            raise ConfigError("set cluster.container_image (pyxis) or cluster.apptainer_image, not both")
        if self.rendezvous_timeout_s <= 0:
            raise ConfigError(f"cluster.rendezvous_timeout_s must be > 0, got {self.rendezvous_timeout_s}")
        if self.platform and self.platform not in PLATFORMS:
            raise ConfigError(f"cluster.platform={self.platform!r} is not one of {', '.join(PLATFORMS)}")
        if self.platform and self.gpus_per_node not in (0, PLATFORMS[self.platform].gpus_per_node):
            p = PLATFORMS[self.platform]
            raise ConfigError(f"cluster.platform={p.name} has {p.gpus_per_node} GPUs per node, but "
                              f"cluster.gpus_per_node={self.gpus_per_node}; set cluster.gpus_per_node={p.gpus_per_node} "
                              f"(miles-submit --platform rescales the node counts for you)")
        if self.domain_nodes < 0:
            raise ConfigError(f"cluster.domain_nodes must be >= 0, got {self.domain_nodes}")
        if self.rank_order not in RANK_ORDERS:
            raise ConfigError(f"cluster.rank_order={self.rank_order!r} is not one of {RANK_ORDERS}")
        if self.imex_channel_per_segment and not (self.platform and PLATFORMS[self.platform].needs_imex):
            raise ConfigError(f"cluster.imex_channel_per_segment needs a platform that uses IMEX "
                              f"({', '.join(p.name for p in PLATFORMS.values() if p.needs_imex)}), "
                              f"got cluster.platform={self.platform!r}")
        for line in self.sbatch_extra:
            if not line.strip().startswith("-") or "\n" in line:
                raise ConfigError(f"cluster.sbatch_extra item {line!r} must be one sbatch option such as "
                                  f"'--mail-type=END' (without '#SBATCH')")

    @property
    def fabric_domain_nodes(self) -> int:
        """Nodes per domain: domain_nodes, else the platform's, else 1."""
        return self.domain_nodes or (PLATFORMS[self.platform].domain_nodes if self.platform else 1)

    @property
    def fabric(self) -> str:
        """The domain fabric's name for explanations."""
        return PLATFORMS[self.platform].fabric if self.platform else "NVLink"
