"""`python -m miles.config.cli`: resolved YAML on stdout, exit 2 with one message on bad input."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from miles.config.loader import config_to_dict, load_config

HERE = Path(__file__).resolve().parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "miles.config.cli", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_prints_resolved_config(valid_recipe):
    overrides = ["rollout.temperature=0.5", "--trainer.lr=2e-6"]
    result = _cli("--recipe", str(valid_recipe), *overrides)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed == config_to_dict(load_config(valid_recipe, overrides))
    assert printed["rollout"]["temperature"] == 0.5 and printed["trainer"]["global_batch_size"] == 8


def test_bad_input_exits_2_with_one_line_and_no_traceback(valid_recipe):
    result = _cli("--recipe", str(valid_recipe), "rollout.temprature=0.5")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "error: override 'rollout.temprature=0.5': unknown key 'rollout.temprature'; did you mean 'rollout.temperature'?"
    )
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_bad_recipe_and_unknown_recipe_exit_2(write_recipe):
    bad = write_recipe("rollout:\n  shuffle: yes\n")
    result = _cli("--recipe", str(bad))
    assert (result.returncode, result.stderr) == (2, f"error: {bad}:2: rollout.shuffle: expected bool, got 'yes' (str)\n")
    result = _cli("--recipe", "no-such-recipe-qx")
    assert result.returncode == 2 and result.stderr.startswith("error: no recipe named 'no-such-recipe-qx'")


def test_list_recipes():
    result = _cli("--list-recipes")
    assert result.returncode == 0
    assert {"quickstart", "qwen3-tiny-embedded"} <= set(result.stdout.split())
