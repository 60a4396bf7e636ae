"""The reward plug-point: `RewardFn`, named in recipes as "module:function" (reward.fn)."""

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class RewardInput:
    """What a reward function sees for one response."""

    prompt: Any
    """The prompt as read from the data source (string or chat messages)."""
    response: str
    """The decoded response text."""
    label: Any
    """The reference answer from the data row (None when the row has none)."""
    metadata: dict = field(default_factory=dict)
    """Extras from the data row."""


class RewardFn(Protocol):
    """Scores one response. Must be deterministic and cheap; returns a float (typically 0..1)."""

    def __call__(self, inp: RewardInput) -> float: ...
