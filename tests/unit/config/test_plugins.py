"""Plug-point loader: "module:function" -> checked callable; all errors of a config reported together."""

import pytest

from miles.config.loader import iter_config_keys, load_config
from miles.config.plugins import PLUGIN_FIELDS, REQUIRED_PLUGINS, load_plugin, resolve_plugins, validate_plugins
from miles.config.run_config import RunConfig
from miles.errors import ConfigError
from miles.reward.config import RewardConfig
from miles.reward.types import RewardFn, RewardInput
from miles.rollout.config import RolloutConfig
from miles.rollout.sample import Sample
from miles.rollout.types import DynamicFilter, FilterInput, FilterOutput
from miles.trainer.config import TrainerConfig

INP = RewardInput(prompt="p", response="abcd", label=None)


@pytest.mark.parametrize(
    "name, expected",
    [("length_reward", 4.0), ("reward_with_default", 8.0), ("reward_varargs", 1.0), ("scaled_reward", 40.0)],
)
def test_valid_reward_plugins_load_and_run(name, expected):
    fn = load_plugin(f"plugins_for_tests:{name}", RewardFn, "reward.fn")
    assert fn(INP) == expected


def test_valid_filter_plugin():
    fn = load_plugin("plugins_for_tests:keep_if_any_reward", DynamicFilter, "rollout.dynamic_filter")
    group = tuple(Sample(group_id=0, index=i, prompt_tokens=[1], reward=0.0) for i in range(2))
    assert fn(FilterInput(group=group)) == FilterOutput(keep=False, reason="all_zero")


@pytest.mark.parametrize("path", ["plugins_for_tests", ":length_reward", "plugins_for_tests:",
                                  "plugins_for_tests:RewardClass.__init__", ".plugins_for_tests:length_reward",
                                  "a:b:c"])
def test_malformed_path(path):
    with pytest.raises(ConfigError) as e:
        load_plugin(path, RewardFn, "reward.fn")
    assert str(e.value) == (
        f"reward.fn={path!r}: expected \"package.module:function\" (a module-level callable implementing RewardFn)"
    )


def test_unknown_module():
    with pytest.raises(ConfigError) as e:
        load_plugin("no_such_module_qx:fn", RewardFn, "reward.fn")
    assert str(e.value) == (
        "reward.fn='no_such_module_qx:fn': cannot import module 'no_such_module_qx': No module named 'no_such_module_qx'"
    )


def test_module_whose_own_import_fails(tmp_path, monkeypatch):
    (tmp_path / "plugin_with_bad_dep_qx.py").write_text("import missing_dependency_qx\n\ndef fn(inp):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"cannot import module 'plugin_with_bad_dep_qx': No module named 'missing_dependency_qx'"):
        load_plugin("plugin_with_bad_dep_qx:fn", RewardFn, "reward.fn")


def test_missing_attribute_lists_public_callables():
    with pytest.raises(ConfigError) as e:
        load_plugin("plugins_for_tests:length_rewrd", RewardFn, "reward.fn")
    assert str(e.value) == (
        "reward.fn='plugins_for_tests:length_rewrd': module 'plugins_for_tests' has no attribute 'length_rewrd'; "
        "did you mean 'length_reward'? Its public callables: FilterInput, FilterOutput, RewardClass, RewardInput, "
        "async_reward, keep_if_any_reward, keyword_only_required, length_reward, no_args, reward_varargs, "
        "reward_with_default, scaled_reward, two_required"
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NOT_CALLABLE", "NOT_CALLABLE is a int, not callable"),
        ("RewardClass", "RewardClass is a class; name a function (or a module-level instance with __call__)"),
        ("async_reward", "async_reward is async; RewardFn is called synchronously"),
    ],
)
def test_not_a_plain_callable(name, expected):
    with pytest.raises(ConfigError) as e:
        load_plugin(f"plugins_for_tests:{name}", RewardFn, "reward.fn")
    assert str(e.value) == f"reward.fn='plugins_for_tests:{name}': {expected}"


@pytest.mark.parametrize(
    "name, signature",
    [
        ("two_required", "(inp: miles.reward.types.RewardInput, other: int) -> float"),
        ("no_args", "() -> float"),
        ("keyword_only_required", "(inp: miles.reward.types.RewardInput, *, tag: str) -> float"),
    ],
)
def test_wrong_arity(name, signature):
    with pytest.raises(ConfigError) as e:
        load_plugin(f"plugins_for_tests:{name}", RewardFn, "reward.fn")
    msg = str(e.value)
    assert msg.startswith(f"reward.fn='plugins_for_tests:{name}': signature {signature} does not match "
                          "RewardFn(inp: miles.reward.types.RewardInput) -> float: it must take 1 positional argument(s)")
    assert ("keyword-only" in msg) == (name == "keyword_only_required")


def _cfg(reward: str, dynamic_filter: str) -> RunConfig:
    return RunConfig(
        rollout=RolloutConfig(rollout_batch_size=1, n_samples_per_prompt=1, dynamic_filter=dynamic_filter),
        trainer=TrainerConfig(num_steps_per_rollout=1),
        reward=RewardConfig(fn=reward),
    )


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        validate_plugins(_cfg("no_such_module_qx:fn", "plugins_for_tests:two_required"))
    lines = str(e.value).splitlines()
    assert lines[0] == "2 plug-point errors:"
    assert lines[1].startswith("  reward.fn='no_such_module_qx:fn': cannot import module 'no_such_module_qx'")
    assert lines[2].startswith("  rollout.dynamic_filter='plugins_for_tests:two_required': signature ")
    assert "DynamicFilter(inp: miles.rollout.types.FilterInput) -> miles.rollout.types.FilterOutput" in lines[2]


def test_all_errors_reported_together_from_a_recipe(write_recipe):
    path = write_recipe(
        "reward:\n  fn: plugins_for_tests:nope\n"
        "rollout:\n  rollout_batch_size: 2\n  n_samples_per_prompt: 2\n  dynamic_filter: no_such_module_qx:f\n"
        "trainer:\n  num_steps_per_rollout: 1\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith("2 plug-point errors:\n  reward.fn='plugins_for_tests:nope': module 'plugins_for_tests' has no attribute 'nope'")
    assert "\n  rollout.dynamic_filter='no_such_module_qx:f': cannot import module 'no_such_module_qx'" in msg


def test_required_and_optional_plugins():
    with pytest.raises(ConfigError) as e:
        validate_plugins(_cfg("", ""))
    assert str(e.value) == 'reward.fn is required: a "package.module:function" implementing RewardFn'
    assert list(validate_plugins(_cfg("plugins_for_tests:length_reward", ""))) == ["reward.fn"]
    fns = resolve_plugins(_cfg("plugins_for_tests:length_reward", "plugins_for_tests:keep_if_any_reward"))
    assert fns["reward.fn"](INP) == 4.0
    assert fns["rollout.dynamic_filter"](FilterInput(group=())).keep is False


def test_plugin_fields_are_str_config_keys():
    keys = {key: type_name for key, type_name, _ in iter_config_keys()}
    assert set(PLUGIN_FIELDS) == {"reward.fn", "rollout.dynamic_filter"}
    assert REQUIRED_PLUGINS <= set(PLUGIN_FIELDS)
    for field in PLUGIN_FIELDS:
        assert keys[field] == "str", field
