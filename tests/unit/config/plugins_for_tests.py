"""Plug-point implementations (good and broken) that the config tests name as "plugins_for_tests:NAME".

tests/unit/config/conftest.py puts this folder on sys.path for every test here.
"""

from miles.reward.types import RewardInput
from miles.rollout.types import FilterInput, FilterOutput

NOT_CALLABLE = 3


def length_reward(inp: RewardInput) -> float:
    """A valid RewardFn: the response length."""
    return float(len(inp.response))


def keep_if_any_reward(inp: FilterInput) -> FilterOutput:
    """A valid DynamicFilter: keep groups where some sample has a positive reward."""
    keep = any((s.reward or 0) > 0 for s in inp.group)
    return FilterOutput(keep=keep, reason="" if keep else "all_zero")


def reward_with_default(inp: RewardInput, scale: float = 2.0) -> float:
    """Valid: the extra parameter has a default."""
    return scale * len(inp.response)


def reward_varargs(*args) -> float:
    """Valid: accepts any number of positional arguments."""
    return float(len(args))


def two_required(inp: RewardInput, other: int) -> float:
    """Invalid: two required positional parameters."""
    return 0.0


def no_args() -> float:
    """Invalid: takes nothing."""
    return 0.0


def keyword_only_required(inp: RewardInput, *, tag: str) -> float:
    """Invalid: a required keyword-only parameter."""
    return 0.0


async def async_reward(inp: RewardInput) -> float:
    """Invalid: the protocol is synchronous."""
    return 0.0


class RewardClass:
    """Invalid as a plug-point itself (calling it would construct an instance)."""

    def __init__(self, inp: RewardInput) -> None:
        self.inp = inp


class _Scaled:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, inp: RewardInput) -> float:
        return self.scale * len(inp.response)


scaled_reward = _Scaled(10.0)
"""Valid: a module-level callable instance."""
