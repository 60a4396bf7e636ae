"""Strict recipe parsing: keys, types, lines, recipe lookup, resolved-config round trip."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from miles.config.loader import (
    CONFIG_DIR_ENV,
    config_to_dict,
    load_config,
    resolve_recipe,
    run_dir,
    write_resolved_config,
)
from miles.config.run_config import RunConfig
from miles.engines.config import EngineConfig
from miles.errors import ConfigError

SECTIONS = ", ".join(f.name for f in dataclasses.fields(RunConfig))

REWARD = "plugins_for_tests:length_reward"


def _recipe(body: str) -> str:
    """A valid recipe with `body` spliced in as extra sections (body must not repeat reward/trainer)."""
    return f"reward:\n  fn: {REWARD}\ntrainer:\n  num_steps_per_rollout: 1\n{body}"


def test_values_defaults_and_conversions(write_recipe):
    path = write_recipe(_recipe(
        "rollout:\n"
        "  rollout_batch_size: 4\n"
        "  n_samples_per_prompt: 2\n"
        "  temperature: 1\n"          # int accepted for a float
        "  shuffle: false\n"
        "engine:\n"
        "  num_engines: 3\n"
        "  extra_args: [--foo, bar]\n"
        "run:\n"
        "  name: x\n"
    ) + "router:\n  health_check_interval_s: 5e-1\n")  # exponent float without a dot
    cfg = load_config(path)
    assert cfg.engine.num_engines == 3
    assert cfg.engine.extra_args == ("--foo", "bar")
    assert cfg.rollout.temperature == 1.0 and type(cfg.rollout.temperature) is float
    assert cfg.rollout.shuffle is False
    assert cfg.router.health_check_interval_s == 0.5
    assert cfg.trainer.global_batch_size == 8  # derived: 4 x 2 / 1
    assert cfg.rollout.max_new_tokens == 64 and cfg.router.port == 29000  # defaults


def test_unknown_top_level_key_names_line_and_valid_keys(write_recipe):
    path = write_recipe(_recipe("rollot:\n  temperature: 0.5\n"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:5:" in msg
    assert "unknown key 'rollot'" in msg
    assert "did you mean 'rollout'?" in msg
    assert "Valid keys of the top level: " + SECTIONS in msg


def test_unknown_nested_key_names_dotted_key_line_and_section_keys(write_recipe):
    path = write_recipe(_recipe("rollout:\n  rollout_batch_size: 4\n\n  temprature: 0.5\n"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:8:" in msg
    assert "unknown key 'rollout.temprature'" in msg
    assert "did you mean 'rollout.temperature'?" in msg
    assert "Valid keys of rollout: data_path, prompt_key, label_key, apply_chat_template" in msg
    assert "dynamic_filter" in msg


def test_unknown_key_without_close_match_has_no_suggestion(write_recipe):
    path = write_recipe(_recipe("engine:\n  zzzzzz: 1\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'engine.zzzzzz'. Valid keys of engine: kind, num_engines") as e:
        load_config(path)
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize(
    "section, line",
    [
        ("rollout:\n  max_new_tokens: ten\n", "rollout.max_new_tokens: expected int, got 'ten' (str)"),
        ("rollout:\n  max_new_tokens: 1.5\n", "rollout.max_new_tokens: expected int, got 1.5 (float)"),
        ("rollout:\n  max_new_tokens: true\n", "rollout.max_new_tokens: expected int, got True (bool)"),
        ("rollout:\n  temperature: hot\n", "rollout.temperature: expected float, got 'hot' (str)"),
        ("rollout:\n  shuffle: yes\n", "rollout.shuffle: expected bool, got 'yes' (str)"),
        ("rollout:\n  shuffle: 1\n", "rollout.shuffle: expected bool, got 1 (int)"),
        ("rollout:\n  rollout_batch_size: four\n", "rollout.rollout_batch_size: expected int | None, got 'four' (str)"),
        ("run:\n  name: 123\n", "run.name: expected str, got 123 (int) (quote it to pass a string)"),
        ("engine:\n  extra_args: --x\n", "engine.extra_args: expected list of str, got '--x' (str)"),
        ("engine:\n  extra_args: [1]\n", "engine.extra_args: expected list of str, got [1] (list)"),
        ("model:\n  path:\n", "model.path: expected str, got null"),
    ],
)
def test_wrong_type_names_file_line_key_type_and_value(write_recipe, section, line):
    path = write_recipe(_recipe(section))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:6: {line}"


def test_section_must_be_a_mapping(write_recipe):
    path = write_recipe(_recipe("rollout: 5\n"))
    with pytest.raises(ConfigError, match=r":5: section 'rollout' must be a mapping of keys \(data_path, "):
        load_config(path)


def test_empty_section_means_defaults(write_recipe):
    path = write_recipe(_recipe("router:\nrollout:\n  rollout_batch_size: 2\n  n_samples_per_prompt: 2\n"))
    assert load_config(path).router.port == 29000


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- a\n- b\n", r":1: the recipe must be a mapping of keys \(run, model, "),
        ("just a string\n", r":1: the recipe must be a mapping"),
        ("# only a comment\n", r":1: the recipe is empty"),
        ("rollout:\n  temperature: [1, 2\nreward: {}\n", r":3: invalid YAML: "),
        ("rollout:\n  temperature: 1\n   top_p: 0.5\n", r":3: invalid YAML: "),
        ("a: 1\n---\nb: 2\n", r":2: invalid YAML: "),
        ("rollout:\n  temperature: !!python/name:os.system\n", r":2: invalid YAML: "),
    ],
)
def test_bad_documents_name_file_and_line(write_recipe, text, expected):
    path = write_recipe(text)
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(path)
    assert str(e.value).startswith(str(path))


def test_duplicate_key_is_an_error(write_recipe):
    path = write_recipe(_recipe("engine:\n  num_engines: 2\n  num_engines: 3\n"))
    with pytest.raises(ConfigError, match=r"recipe.yaml:7: duplicate key 'engine.num_engines'"):
        load_config(path)


def test_post_init_error_propagates_with_message_intact(write_recipe):
    path = write_recipe(_recipe("rollout:\n  rollout_batch_size: 2\n  n_samples_per_prompt: 2\nengine:\n  kind: tpu\n"))
    with pytest.raises(ConfigError) as direct:
        EngineConfig(kind="tpu")
    with pytest.raises(ConfigError) as loaded:
        load_config(path)
    assert str(loaded.value) == str(direct.value) == "engine.kind='tpu' is not one of ('embedded', 'sglang')"


def test_recipe_by_name_from_config_dir_env_then_repo(tmp_path, monkeypatch, valid_recipe):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "mine.yaml").write_text(valid_recipe.read_text())
    (extra / "quickstart.yaml").write_text(valid_recipe.read_text())  # shadows configs/quickstart.yaml
    monkeypatch.setenv(CONFIG_DIR_ENV, str(extra))
    assert load_config("mine").run.name == "unit"
    assert resolve_recipe("quickstart") == extra / "quickstart.yaml"
    monkeypatch.delenv(CONFIG_DIR_ENV)
    assert resolve_recipe("quickstart") == Path(__file__).resolve().parents[3] / "configs" / "quickstart.yaml"


def test_unknown_recipe_name_lists_known_recipes():
    with pytest.raises(ConfigError, match=r"no recipe named 'quickstrat'; did you mean 'quickstart'\? Known recipes: .*quickstart"):
        load_config("quickstrat")


def test_missing_recipe_path():
    with pytest.raises(ConfigError, match=r"recipe file '/nonexistent/x.yaml' does not exist"):
        load_config("/nonexistent/x.yaml")


def test_no_recipe_means_defaults_plus_overrides():
    cfg = load_config(None, [f"reward.fn={REWARD}", "rollout.rollout_batch_size=2",
                             "rollout.n_samples_per_prompt=3", "trainer.global_batch_size=6"])
    assert cfg.trainer.num_steps_per_rollout == 1 and cfg.run.name == "miles"


def test_overrides_must_be_a_sequence_not_one_string(valid_recipe):
    with pytest.raises(TypeError):
        load_config(valid_recipe, "rollout.temperature=0.5")


def test_resolved_config_round_trip(valid_recipe, tmp_path):
    tricky = ["yes", "1e-6", "null", "true", "~", "0x10", "--flag=1"]
    cfg = load_config(valid_recipe, [
        f"run.output_dir={tmp_path / 'runs'}",
        f"engine.extra_args={tricky}",
        "model.path='1e3'",
        "trainer.lr=3e-7",
        "rollout.dynamic_filter=plugins_for_tests:keep_if_any_reward",
    ])
    assert cfg.engine.extra_args == tuple(tricky) and cfg.model.path == "1e3"
    out = write_resolved_config(cfg, run_dir(cfg))
    assert out == tmp_path / "runs" / "unit" / "config.yaml"
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # no temp file left
    reloaded = load_config(out)
    assert reloaded == cfg
    # Also readable by a plain YAML 1.1 reader, with the same values (every key, derived sizes included).
    plain = yaml.safe_load(out.read_text())
    assert plain == config_to_dict(cfg)
    assert plain["trainer"]["global_batch_size"] == 8 and plain["trainer"]["lr"] == 3e-7
    # Rewriting replaces the file in place.
    write_resolved_config(load_config(out, ["rollout.temperature=0.25"]), out.parent)
    assert load_config(out).rollout.temperature == 0.25


def test_config_to_dict_lists_every_section_and_key(valid_recipe):
    d = config_to_dict(load_config(valid_recipe))
    assert ", ".join(d) == SECTIONS
    assert d["engine"]["extra_args"] == [] and d["trainer"]["global_batch_size"] == 8


def test_run_dir(valid_recipe):
    cfg = load_config(valid_recipe, ["run.output_dir=/scratch/r", "run.name=exp1"])
    assert run_dir(cfg) == Path("/scratch/r/exp1")
    for bad in ("", "..", "a/b"):
        with pytest.raises(ConfigError, match="run.name="):
            run_dir(load_config(valid_recipe, [f"run.name={bad}"]))
