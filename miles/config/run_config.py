"""The root `RunConfig`: one typed section per subsystem, plus the cross-section checks.

Sections live next to the code that uses them; this file only composes them and enforces the
batch invariant (docs/architecture.md §4):

    rollout.rollout_batch_size x rollout.n_samples_per_prompt
        = trainer.global_batch_size x trainer.num_steps_per_rollout

Set three of the four and the fourth is derived; all four set and disagreeing is a ConfigError.
"""

from dataclasses import dataclass, field, replace

from miles.algo.config import AlgoConfig
from miles.checkpoint.config import CheckpointConfig
from miles.cluster.config import ClusterConfig
from miles.cluster.plan import PlanConfig
from miles.engines.config import EngineConfig, RouterConfig
from miles.errors import ConfigError
from miles.reward.config import RewardConfig
from miles.rollout.config import RolloutConfig
from miles.routing.config import RoutingReplayConfig
from miles.trainer.config import TrainerConfig
from miles.trainer.sft import SftConfig
from miles.weight_sync.config import WeightSyncConfig


@dataclass(frozen=True)
class RunSection:
    """Identity and bookkeeping of one run."""

    name: str = "miles"
    """Run name; the run directory is output_dir/name."""
    output_dir: str = "runs"
    """Parent folder of run directories (configs, logs, checkpoints, TensorBoard)."""
    seed: int = 1234
    """Seed of every random stream (data order, sampling seeds, init)."""
    num_steps: int = 1
    """RL steps (rollout -> train -> weight sync) to run."""

    def __post_init__(self) -> None:
        if self.num_steps < 0:
            raise ConfigError(f"run.num_steps must be >= 0, got {self.num_steps}")


@dataclass(frozen=True)
class ModelConfig:
    """The policy model, as a local Hugging Face checkpoint."""

    path: str = ""
    """Folder holding config.json, tokenizer files and *.safetensors (nothing is downloaded)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one Miles run needs, composed from per-subsystem sections."""

    run: RunSection = field(default_factory=RunSection)
    """Run identity and output location."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy checkpoint."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engines."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Router in front of the engines."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout generation."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Policy update."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Advantages, policy loss, corrections, KL and entropy terms."""
    r3: RoutingReplayConfig = field(default_factory=RoutingReplayConfig)
    """Rollout routing replay for MoE models (node-local HDF5 dumps)."""
    sft: SftConfig = field(default_factory=SftConfig)
    """Optional supervised warm-up before RL."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Trainer -> engine weight transfer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence, retention, forced saves and resume."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Slurm het-job layout and sbatch options (miles-submit)."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """Published architecture and planned parallel layout (dry-run memory estimate, support check)."""

    def __post_init__(self) -> None:
        rollout, trainer = derive_batch_sizes(self.rollout, self.trainer)
        object.__setattr__(self, "rollout", rollout)
        object.__setattr__(self, "trainer", trainer)


def derive_batch_sizes(rollout: RolloutConfig, trainer: TrainerConfig) -> tuple[RolloutConfig, TrainerConfig]:
    """Apply the batch invariant: derive the one missing size, or check that all four agree."""
    sizes = {
        "rollout.rollout_batch_size": rollout.rollout_batch_size,
        "rollout.n_samples_per_prompt": rollout.n_samples_per_prompt,
        "trainer.global_batch_size": trainer.global_batch_size,
        "trainer.num_steps_per_rollout": trainer.num_steps_per_rollout,
    }
    missing = [name for name, value in sizes.items() if value is None]
    if len(missing) > 1:
        raise ConfigError(
            f"batch sizes: set at least three of {', '.join(sizes)}; missing {', '.join(missing)}"
        )
    rbs, n, gbs, steps = sizes.values()
    if not missing:
        if rbs * n != gbs * steps:
            raise ConfigError(
                "batch invariant violated: rollout.rollout_batch_size x rollout.n_samples_per_prompt "
                f"= {rbs} x {n} = {rbs * n}, but trainer.global_batch_size x trainer.num_steps_per_rollout "
                f"= {gbs} x {steps} = {gbs * steps}; leave one of the four unset to derive it"
            )
        return rollout, trainer
    name = missing[0]
    if name.startswith("rollout."):
        known, divisor = gbs * steps, (n if name.endswith("rollout_batch_size") else rbs)
    else:
        known, divisor = rbs * n, (steps if name.endswith("global_batch_size") else gbs)
    if known % divisor:
        raise ConfigError(
            f"batch invariant: cannot derive {name}: {known} samples per step is not divisible by {divisor}"
        )
    section, key = name.split(".")
    if section == "rollout":
        return replace(rollout, **{key: known // divisor}), trainer
    return rollout, replace(trainer, **{key: known // divisor})
