"""Built-in dynamic filters."""

import pytest

from miles.rollout.filters import drop_aborted_groups, drop_zero_std_groups
from miles.rollout.sample import Sample, SampleStatus
from miles.rollout.types import FilterInput


def group(rewards, statuses=None) -> FilterInput:
    statuses = statuses or [SampleStatus.COMPLETED] * len(rewards)
    return FilterInput(group=tuple(
        Sample(group_id=7, index=i, prompt_tokens=[1], reward=r, status=st) for i, (r, st) in enumerate(zip(rewards, statuses))
    ))


def test_zero_std_drops_equal_rewards():
    out = drop_zero_std_groups(group([1.0, 1.0, 1.0, 1.0]))
    assert (out.keep, out.reason) == (False, "zero_std")
    assert drop_zero_std_groups(group([0.0, 0.0])).reason == "zero_std"
    assert drop_zero_std_groups(group([0.5])).keep is False  # one sample has no spread


def test_zero_std_keeps_spread():
    out = drop_zero_std_groups(group([0.0, 1.0, 0.0, 0.0]))
    assert out.keep is True and out.reason == ""
    assert drop_zero_std_groups(group([0.25, 0.2500001])).keep is True


def test_zero_std_needs_rewards():
    with pytest.raises(ValueError, match=r"\['7-1'\] have none"):
        drop_zero_std_groups(group([1.0, None]))


def test_aborted():
    C, A, T = SampleStatus.COMPLETED, SampleStatus.ABORTED, SampleStatus.TRUNCATED
    out = drop_aborted_groups(group([1.0, 0.0, 1.0], [C, A, T]))
    assert (out.keep, out.reason) == (False, "aborted")
    assert drop_aborted_groups(group([1.0, 0.0], [C, T])).keep is True


@pytest.mark.parametrize("name", ["drop_zero_std_groups", "drop_aborted_groups"])
def test_filters_pass_the_plugin_loader(name):
    from miles.config.plugins import load_plugin
    from miles.rollout.types import DynamicFilter

    fn = load_plugin(f"miles.rollout.filters:{name}", DynamicFilter, "rollout.dynamic_filter")
    assert fn(group([0.0, 1.0])).keep is True
