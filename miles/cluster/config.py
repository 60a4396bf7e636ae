"""Configuration of the Slurm job: the het-job layout and the sbatch options (recipe section `cluster`).

miles-submit's flags (--partition, --nodes-train, ...) are overrides of these keys, so the resolved
config in the run directory records how the job was submitted. See docs/slurm.md.
"""

from dataclasses import dataclass, field

from miles.errors import ConfigError

BOOTSTRAPS = ("env", "mpi")


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
        for line in self.sbatch_extra:
            if not line.strip().startswith("-") or "\n" in line:
                raise ConfigError(f"cluster.sbatch_extra item {line!r} must be one sbatch option such as "
                                  f"'--mail-type=END' (without '#SBATCH')")
