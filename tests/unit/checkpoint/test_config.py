"""CheckpointConfig: validation, resolved folder and sentinel path, the save interval."""

from pathlib import Path

import pytest

from miles.checkpoint.config import CheckpointConfig
from miles.errors import ConfigError


def test_defaults_resolve_inside_the_run_dir():
    cfg = CheckpointConfig()
    assert cfg.resolve_dir("runs/a") == Path("runs/a/checkpoints")
    assert cfg.sentinel_path("runs/a") == Path("runs/a/checkpoints/SAVE_NOW")
    assert cfg.resume and cfg.keep_last == 2
    assert not any(cfg.is_due(step) for step in range(10))  # save_interval 0: only on demand


def test_explicit_dir_sentinel_and_interval():
    cfg = CheckpointConfig(dir="/scratch/ck", sentinel="/tmp/force-save", save_interval=3)
    assert cfg.resolve_dir("runs/a") == Path("/scratch/ck")
    assert cfg.sentinel_path("runs/a") == Path("/tmp/force-save")
    assert [s for s in range(10) if cfg.is_due(s)] == [3, 6, 9]
    assert CheckpointConfig(sentinel="").sentinel_path("runs/a") is None


@pytest.mark.parametrize("kwargs, message", [
    ({"keep_last": 0}, "checkpoint.keep_last must be >= 1, got 0"),
    ({"save_interval": -1}, "checkpoint.save_interval must be >= 0"),
])
def test_invalid_values_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CheckpointConfig(**kwargs)


def test_sentinel_requests_a_save_until_cleared(tmp_path):
    from miles.checkpoint.sentinel import clear_sentinel, save_requested

    path = CheckpointConfig().sentinel_path(tmp_path)
    assert not save_requested(path) and not save_requested(None)
    path.parent.mkdir()
    path.touch()
    assert save_requested(path)
    clear_sentinel(path)
    assert not path.exists() and not save_requested(path)
    clear_sentinel(path)  # already gone: fine
