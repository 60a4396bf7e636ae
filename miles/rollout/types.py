"""Rollout plug-points: the dynamic-sampling filter."""

from dataclasses import dataclass
from typing import Protocol

from miles.rollout.sample import Sample


@dataclass(frozen=True)
class FilterInput:
    """One finished, rewarded prompt group."""

    group: tuple[Sample, ...]
    """The n samples of one prompt, rewards set."""


@dataclass(frozen=True)
class FilterOutput:
    """Whether to keep the group, and why not."""

    keep: bool
    """False drops the whole group from the training batch."""
    reason: str = ""
    """Short reason for dropping, counted in metrics (e.g. "zero_std")."""


class DynamicFilter(Protocol):
    """Decides per group whether it enters the batch (DAPO-style dynamic sampling)."""

    def __call__(self, inp: FilterInput) -> FilterOutput: ...
