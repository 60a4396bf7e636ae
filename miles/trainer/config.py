"""Configuration of the Megatron trainer (optimizer, batch sizes, parallelism)."""

from dataclasses import dataclass

from miles.errors import ConfigError


@dataclass(frozen=True)
class TrainerConfig:
    """How the policy is updated from a batch of samples."""

    global_batch_size: int | None = None
    """Samples per optimizer step, summed over data-parallel ranks."""
    num_steps_per_rollout: int | None = None
    """Optimizer steps taken on each rollout batch."""
    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    tensor_model_parallel_size: int = 1
    """Megatron TP size."""
    micro_batch_size: int = 1
    """Samples per forward/backward micro-batch."""

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "num_steps_per_rollout"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {value}")
        if self.lr < 0:
            raise ConfigError(f"trainer.lr must be >= 0, got {self.lr}")
        if self.tensor_model_parallel_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("trainer.tensor_model_parallel_size and micro_batch_size must be >= 1")
