"""`Sample`: one prompt's response as it travels from rollout to trainer.

Contract (docs/architecture.md §4): prompt tokens, response tokens, loss mask, rollout logprobs,
reward, group id, status, weight version, and a reference to routed experts (never the array
itself once it is dumped to node-local storage).
"""

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class SampleStatus(str, Enum):
    """Where a sample's generation ended."""

    PENDING = "pending"
    COMPLETED = "completed"  # stopped on EOS / a stop token
    TRUNCATED = "truncated"  # hit max_new_tokens
    ABORTED = "aborted"  # aborted by the engine (pause, abort_request)
    FAILED = "failed"  # transport failure after all retries


@dataclass
class Sample:
    """One response to one prompt. `group_id` ties the n samples of the same prompt together."""

    group_id: int
    """Index of the prompt group within the run (stable across restarts)."""
    index: int
    """Index of this sample within its group, 0..n_samples_per_prompt-1."""
    prompt_tokens: list[int]
    """Token ids of the prompt, exactly as sent to the engine."""
    prompt: Any = None
    """The prompt as read from the data source (string or chat messages)."""
    label: Any = None
    """Reference answer for the reward function."""
    response_tokens: list[int] = field(default_factory=list)
    """Generated token ids."""
    response_text: str = ""
    """Decoded response."""
    loss_mask: list[int] = field(default_factory=list)
    """1 for response tokens that are trained on; len == len(response_tokens)."""
    rollout_logprobs: list[float] = field(default_factory=list)
    """Engine logprob of each response token, log_softmax(logits / T)."""
    reward: float | None = None
    """Scalar reward once scored."""
    status: SampleStatus = SampleStatus.PENDING
    """How generation ended."""
    weight_version: str = ""
    """Engine weight version that generated the response."""
    routed_experts_ref: str | None = None
    """Where this sample's routed experts live (R3 dump store key), not the array."""
    metadata: dict = field(default_factory=dict)
    """Free-form extras from the data row or plug-points."""

    @property
    def sample_id(self) -> str:
        """Stable id, unique within a run: "<group_id>-<index>"."""
        return f"{self.group_id}-{self.index}"

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by response."""
        return self.prompt_tokens + self.response_tokens

    def to_dict(self) -> dict:
        """JSON-serialisable form (status as its string value)."""
        out = asdict(self)
        out["status"] = self.status.value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Sample":
        """Inverse of to_dict."""
        data = dict(data)
        data["status"] = SampleStatus(data.get("status", SampleStatus.PENDING.value))
        return cls(**data)
