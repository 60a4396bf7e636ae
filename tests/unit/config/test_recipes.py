"""Every recipe under configs/ loads, passes every check (plug-points included) and round-trips."""

from pathlib import Path

import pytest

from miles.config.loader import config_to_yaml, load_config, write_resolved_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_recipes_exist():
    assert {"quickstart", "qwen3-tiny-embedded"} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_round_trips(path, tmp_path):
    assert path.read_text().startswith("#"), "each recipe starts with a comment saying what it runs"
    cfg = load_config(path.stem)
    assert cfg == load_config(path)
    assert load_config(write_resolved_config(cfg, tmp_path)) == cfg


def test_quickstart_values():
    cfg = load_config("quickstart")
    assert cfg.engine.kind == "embedded" and cfg.engine.num_engines == 2
    assert cfg.model.path == ".cache/models/qwen3-tiny"
    assert cfg.rollout.data_path == ".cache/data/quickstart.jsonl"
    assert (cfg.rollout.rollout_batch_size, cfg.rollout.n_samples_per_prompt) == (16, 8)
    assert (cfg.trainer.global_batch_size, cfg.trainer.num_steps_per_rollout) == (128, 1)
    assert cfg.rollout.max_new_tokens == 4
    assert cfg.reward.fn == "miles.reward.builtin:exact_match"
    assert cfg.rollout.dynamic_filter == "miles.rollout.filters:drop_zero_std_groups"
    assert load_config("qwen3-tiny-embedded").engine.num_engines == 1


def test_quickstart_resolved_config_matches_golden(assert_golden):
    """The artifact written into the quickstart's run directory, pinned (UPDATE_GOLDEN=1 regenerates)."""
    assert_golden("quickstart.resolved.yaml", config_to_yaml(load_config("quickstart")))
