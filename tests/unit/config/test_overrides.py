"""Dotted overrides: applied after the recipe, typed, and rejected with the valid keys."""

import dataclasses

import pytest

from miles.config.loader import load_config
from miles.config.run_config import RunConfig
from miles.errors import ConfigError

SECTIONS = ", ".join(f.name for f in dataclasses.fields(RunConfig))


def test_overrides_apply_after_recipe_left_to_right(valid_recipe):
    cfg = load_config(valid_recipe, [
        "rollout.temperature=0.7",
        "--trainer.lr=1e-6",
        "rollout.rollout_batch_size=8",       # recipe said 4; global batch re-derived from the new value
        "engine.extra_args=[--foo, 'bar baz']",
        "run.name=first",
        "run.name=second",
        "rollout.apply_chat_template=true",
    ])
    assert cfg.rollout.temperature == 0.7
    assert cfg.trainer.lr == 1e-6 and type(cfg.trainer.lr) is float
    assert cfg.rollout.rollout_batch_size == 8 and cfg.trainer.global_batch_size == 16
    assert cfg.engine.extra_args == ("--foo", "bar baz")
    assert cfg.run.name == "second"
    assert cfg.rollout.apply_chat_template is True


def test_empty_value_sets_str_to_empty_and_null_unsets_optional(valid_recipe):
    cfg = load_config(valid_recipe, [
        "rollout.dynamic_filter=plugins_for_tests:keep_if_any_reward",
        "rollout.dynamic_filter=",
        "trainer.global_batch_size=4",
        "trainer.num_steps_per_rollout=null",  # now derived: 4 x 2 / 4 = 2
    ])
    assert cfg.rollout.dynamic_filter == ""
    assert cfg.trainer.num_steps_per_rollout == 2


def test_unknown_top_level_path_lists_sections(valid_recipe):
    with pytest.raises(ConfigError) as e:
        load_config(valid_recipe, ["rollot.temperature=0.7"])
    assert str(e.value) == (
        "override 'rollot.temperature=0.7': unknown key 'rollot.temperature'; did you mean 'rollout.temperature'? "
        "Valid keys of the top level: " + SECTIONS
    )


def test_unknown_nested_path_lists_section_keys(valid_recipe):
    with pytest.raises(ConfigError) as e:
        load_config(valid_recipe, ["--rollout.temprature=0.7"])
    msg = str(e.value)
    assert msg.startswith("override '--rollout.temprature=0.7': unknown key 'rollout.temprature'; "
                          "did you mean 'rollout.temperature'? Valid keys of rollout: data_path, prompt_key,")
    assert msg.endswith("request_retries, max_rounds, dynamic_filter")


def test_missing_equals_sign(valid_recipe):
    # "--rollout.temperature 0.7" reaches the loader as two separate arguments.
    with pytest.raises(ConfigError) as e:
        load_config(valid_recipe, ["--rollout.temperature", "0.7"])
    assert str(e.value) == (
        "override '--rollout.temperature': expected KEY=VALUE with a dotted key, e.g. rollout.temperature=0.7 "
        "(sections: " + SECTIONS + ")"
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.max_new_tokens=many", "rollout.max_new_tokens: expected int, got 'many' (str)"),
        ("rollout.shuffle=yes", "rollout.shuffle: expected bool, got 'yes' (str)"),
        ("rollout.shuffle=0", "rollout.shuffle: expected bool, got 0 (int)"),
        ("rollout.temperature=[1]", "rollout.temperature: expected float, got [1] (list)"),
        ("run.name=7", "run.name: expected str, got 7 (int) (quote it to pass a string)"),
        ("engine.extra_args=--x", "engine.extra_args: expected list of str, got '--x' (str)"),
        ("rollout.max_new_tokens=", "rollout.max_new_tokens: expected int, got null"),
    ],
)
def test_wrong_type_names_override_key_type_and_value(valid_recipe, override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(valid_recipe, [override])
    assert str(e.value) == f"override {override!r}: {expected}"


def test_section_and_leaf_confusion(valid_recipe):
    with pytest.raises(ConfigError, match=r"override 'rollout=3': rollout is a section; set one of its keys "
                                          r"\(rollout.data_path=...\). Valid keys of rollout: data_path, "):
        load_config(valid_recipe, ["rollout=3"])
    with pytest.raises(ConfigError, match=r"override 'rollout.temperature.x=1': rollout.temperature is a float value, not a section"):
        load_config(valid_recipe, ["rollout.temperature.x=1"])


def test_invalid_yaml_value(valid_recipe):
    with pytest.raises(ConfigError, match=r"override 'rollout.temperature=\[1,': value '\[1,' is not valid YAML"):
        load_config(valid_recipe, ["rollout.temperature=[1,"])


def test_post_init_error_from_override_keeps_its_message(valid_recipe):
    with pytest.raises(ConfigError) as e:
        load_config(valid_recipe, ["rollout.temperature=0"])
    assert str(e.value) == "rollout.temperature must be > 0, got 0.0"
