"""Batch invariant: rollout_batch_size x n_samples_per_prompt = global_batch_size x num_steps_per_rollout."""

import pytest

from miles.config.loader import load_config
from miles.config.run_config import RunConfig
from miles.errors import ConfigError
from miles.rollout.config import RolloutConfig
from miles.trainer.config import TrainerConfig

SIZES = {
    "rollout.rollout_batch_size": 8,
    "rollout.n_samples_per_prompt": 4,
    "trainer.global_batch_size": 16,
    "trainer.num_steps_per_rollout": 2,
}
REWARD = "reward.fn=plugins_for_tests:length_reward"


def _overrides(sizes: dict) -> list[str]:
    return [REWARD] + [f"{key}={value}" for key, value in sizes.items()]


def _get(cfg: RunConfig, dotted: str) -> int:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("missing", list(SIZES))
def test_each_size_is_derived_when_missing(missing):
    given = {k: v for k, v in SIZES.items() if k != missing}
    cfg = load_config(None, _overrides(given))
    assert {k: _get(cfg, k) for k in SIZES} == SIZES


def test_all_four_agreeing_is_accepted():
    cfg = load_config(None, _overrides(SIZES))
    assert {k: _get(cfg, k) for k in SIZES} == SIZES


def test_all_four_disagreeing_is_an_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, _overrides({**SIZES, "trainer.num_steps_per_rollout": 3}))
    assert str(e.value) == (
        "batch invariant violated: rollout.rollout_batch_size x rollout.n_samples_per_prompt = 8 x 4 = 32, "
        "but trainer.global_batch_size x trainer.num_steps_per_rollout = 16 x 3 = 48; "
        "leave one of the four unset to derive it"
    )


@pytest.mark.parametrize(
    "missing",
    [("rollout.rollout_batch_size", "trainer.global_batch_size"),
     ("rollout.n_samples_per_prompt", "trainer.num_steps_per_rollout")],
)
def test_two_missing_is_an_error(missing):
    given = {k: v for k, v in SIZES.items() if k not in missing}
    with pytest.raises(ConfigError, match=rf"set at least three of .*; missing {missing[0]}, {missing[1]}$"):
        load_config(None, _overrides(given))


@pytest.mark.parametrize(
    "given, message",
    [
        ({"rollout.rollout_batch_size": 3, "rollout.n_samples_per_prompt": 3, "trainer.num_steps_per_rollout": 2},
         "cannot derive trainer.global_batch_size: 9 samples per step is not divisible by 2"),
        ({"rollout.rollout_batch_size": 3, "rollout.n_samples_per_prompt": 3, "trainer.global_batch_size": 4},
         "cannot derive trainer.num_steps_per_rollout: 9 samples per step is not divisible by 4"),
        ({"rollout.n_samples_per_prompt": 3, "trainer.global_batch_size": 4, "trainer.num_steps_per_rollout": 2},
         "cannot derive rollout.rollout_batch_size: 8 samples per step is not divisible by 3"),
        ({"rollout.rollout_batch_size": 3, "trainer.global_batch_size": 4, "trainer.num_steps_per_rollout": 2},
         "cannot derive rollout.n_samples_per_prompt: 8 samples per step is not divisible by 3"),
    ],
)
def test_non_divisible_is_an_error(given, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, _overrides(given))
    assert str(e.value) == f"batch invariant: {message}"


def test_invariant_holds_on_direct_construction():
    cfg = RunConfig(rollout=RolloutConfig(rollout_batch_size=6, n_samples_per_prompt=2),
                    trainer=TrainerConfig(global_batch_size=4))
    assert cfg.trainer.num_steps_per_rollout == 3
    with pytest.raises(ConfigError, match="must be >= 1, got 0"):
        load_config(None, _overrides({**SIZES, "rollout.n_samples_per_prompt": 0}))
