"""Configuration of rollout generation: data, sampling, concurrency and filters."""

from dataclasses import dataclass

from miles.errors import ConfigError


@dataclass(frozen=True)
class RolloutConfig:
    """What to generate each RL step and how."""

    data_path: str = ""
    """JSONL file of prompts, one JSON object per line."""
    prompt_key: str = "prompt"
    """Key of the prompt in each JSONL row (a string, or a list of chat messages)."""
    label_key: str = "label"
    """Key of the reference answer given to the reward function (may be absent from rows)."""
    apply_chat_template: bool = False
    """Render prompts with the tokenizer's chat template (add_generation_prompt=True)."""
    shuffle: bool = True
    """Reshuffle the prompts every epoch, seeded by run.seed + epoch."""
    rollout_batch_size: int | None = None
    """Prompts per RL step. Batch invariant: rollout_batch_size x n_samples_per_prompt =
    trainer.global_batch_size x trainer.num_steps_per_rollout (set three, the fourth is derived)."""
    n_samples_per_prompt: int | None = None
    """Responses sampled per prompt (the GRPO group size)."""
    max_new_tokens: int = 64
    """Most tokens generated per response."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are log_softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    concurrency: int = 64
    """Most /generate requests in flight from one rollout client."""
    request_retries: int = 3
    """Times the client retries a request that failed at the transport level."""
    max_rounds: int = 3
    """With a dynamic filter: rollout rounds per step to collect rollout_batch_size kept groups
    (DAPO over-sampling); when still short, the batch is padded with dropped groups, whose
    zero advantages add no gradient."""
    dynamic_filter: str = ""
    """Optional plug-point "module:function" (a DynamicFilter) that drops whole groups, e.g.
    "miles.rollout.filters:drop_zero_std_groups"; empty = keep every group."""

    def __post_init__(self) -> None:
        for name in ("rollout_batch_size", "n_samples_per_prompt"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"rollout.{name} must be >= 1, got {value}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.max_rounds < 1:
            raise ConfigError(f"rollout.max_rounds must be >= 1, got {self.max_rounds}")
        if self.concurrency < 1:
            raise ConfigError(f"rollout.concurrency must be >= 1, got {self.concurrency}")
