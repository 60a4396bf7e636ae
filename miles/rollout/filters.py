"""Built-in dynamic-sampling filters (DynamicFilter): name them as "miles.rollout.filters:<name>".

- drop_zero_std_groups (DAPO): a group whose rewards are all equal has zero advantage under GRPO
  and teaches nothing; drop it (reason "zero_std"). A group of one sample is always dropped.
- drop_aborted_groups: drop a group in which any sample was aborted by the engine (reason "aborted").
"""

from miles.rollout.sample import SampleStatus
from miles.rollout.types import FilterInput, FilterOutput


def drop_zero_std_groups(inp: FilterInput) -> FilterOutput:
    """Keep a group only if its rewards are not all equal."""
    rewards = [s.reward for s in inp.group]
    if any(r is None for r in rewards):
        unscored = [s.sample_id for s in inp.group if s.reward is None]
        raise ValueError(f"drop_zero_std_groups needs rewards; samples {unscored} have none (filter ran before scoring?)")
    if len(set(rewards)) <= 1:
        return FilterOutput(keep=False, reason="zero_std")
    return FilterOutput(keep=True)


def drop_aborted_groups(inp: FilterInput) -> FilterOutput:
    """Keep a group only if none of its samples was aborted."""
    if any(s.status == SampleStatus.ABORTED for s in inp.group):
        return FilterOutput(keep=False, reason="aborted")
    return FilterOutput(keep=True)
