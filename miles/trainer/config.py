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
    expert_model_parallel_size: int = 1
    """Megatron EP size (MoE models): experts are split over this many ranks, carved out of the
    data-parallel ranks (world size must be a multiple of TP x EP)."""
    recompute_granularity: str | None = None
    """Activation recomputation: None (keep activations) or "full" (recompute each layer in the
    backward pass; with R3 the replayed routing is used again there)."""
    micro_batch_size: int = 1
    """Samples per forward/backward micro-batch (ignored when max_tokens_per_microbatch is set)."""
    max_tokens_per_microbatch: int | None = None
    """Dynamic batching: pack samples into micro-batches of at most this many padded tokens
    (samples x longest sequence); a longer sample gets a micro-batch of its own. None = fixed size."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr; the lr is constant afterwards."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    bf16: bool = False
    """Train in bf16 (Float16Module, fp32 main params and fp32 grad reduction); fp32 otherwise."""
    logprob_impl: str = "full"
    """How per-token log-probs and entropy come out of the model: "full" (the output layer's
    [B, S, V/TP] logits, then log-softmax) or "chunked" (the final hidden states go through
    miles.kernels.logprob_entropy with the output layer's weight: Triton on CUDA, chunked torch on
    CPU, so a micro-batch's full-vocabulary logits are never materialised; works at any TP size)."""

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "num_steps_per_rollout"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {value}")
        if self.lr < 0:
            raise ConfigError(f"trainer.lr must be >= 0, got {self.lr}")
        if min(self.tensor_model_parallel_size, self.expert_model_parallel_size, self.micro_batch_size) < 1:
            raise ConfigError("trainer.tensor_model_parallel_size, expert_model_parallel_size and micro_batch_size "
                              "must be >= 1")
        if self.recompute_granularity not in (None, "full"):
            raise ConfigError(f"trainer.recompute_granularity={self.recompute_granularity!r} is not one of "
                              f"None, 'full'")
        if self.logprob_impl not in ("full", "chunked"):
            raise ConfigError(f"trainer.logprob_impl={self.logprob_impl!r} is not one of 'full', 'chunked'")
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < 1:
            raise ConfigError(f"trainer.max_tokens_per_microbatch must be >= 1 (or unset), "
                              f"got {self.max_tokens_per_microbatch}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"trainer.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError(f"trainer.weight_decay and trainer.clip_grad must be >= 0 (clip_grad 0 = no "
                              f"clipping), got {self.weight_decay} and {self.clip_grad}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"trainer.adam_eps must be > 0, got {self.adam_eps}")
