"""Configuration of the reward function."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardConfig:
    """Which reward function scores each response."""

    fn: str = "miles.reward.builtin:exact_match"
    """Plug-point "module:function" (a RewardFn). Built-ins: miles.reward.builtin:exact_match,
    miles.reward.builtin:math_boxed, miles.reward.builtin:f1."""
