"""Fixtures of the config tests: test plug-points on sys.path, and a recipe writer."""

import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

VALID_RECIPE = """\
run:
  name: unit
reward:
  fn: plugins_for_tests:length_reward
rollout:
  rollout_batch_size: 4
  n_samples_per_prompt: 2
trainer:
  num_steps_per_rollout: 1
"""
"""A minimal valid recipe whose plug-points come from plugins_for_tests."""


@pytest.fixture
def valid_recipe(write_recipe) -> Path:
    """A minimal valid recipe file (4 prompts x 2 samples, one step; reward from plugins_for_tests)."""
    return write_recipe(VALID_RECIPE, "valid.yaml")


@pytest.fixture(autouse=True)
def test_plugins_on_path(monkeypatch):
    """Make `plugins_for_tests` importable by its plug-point path."""
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(text, name="recipe.yaml") -> Path of the dedented YAML written under tmp_path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


