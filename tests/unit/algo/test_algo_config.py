"""AlgoConfig validation: defaults resolve, user mistakes raise ConfigError naming the fix."""

import pytest

from miles.algo.config import ADVANTAGE_ESTIMATORS, AlgoConfig
from miles.errors import ConfigError


def test_defaults_and_eps_clip_high_follows_eps_clip():
    cfg = AlgoConfig()
    assert cfg.advantage_estimator == "grpo"
    assert cfg.eps_clip_high == 0.2  # None resolves to eps_clip
    assert AlgoConfig(eps_clip=0.1).eps_clip_high == 0.1
    assert AlgoConfig(eps_clip=0.2, eps_clip_high=0.28).eps_clip_high == 0.28
    assert AlgoConfig(advantage_estimator="gspo").sequence_level_ratio
    assert not AlgoConfig(advantage_estimator="grpo").sequence_level_ratio


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        AlgoConfig(advantage_estimator="ppo_gae")
    for name in ADVANTAGE_ESTIMATORS:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="k1, k2, k3, low_var_kl"):
        AlgoConfig(kl_estimator="k4")
    with pytest.raises(ConfigError, match="token_mean, sample_mean, constant"):
        AlgoConfig(loss_reduction="seq_sum")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps_clip": 1.0}, "eps_clip must be in"),
        ({"eps_clip_high": -0.1}, "eps_clip_high must be >= 0"),
        ({"dual_clip_c": 1.0}, "dual_clip_c must be > 1"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"kl_coef": 0.1}, "only applies to reinforce_plus_plus"),
        ({"kl_loss_coef": 0.1}, "set use_kl_loss: true"),
        ({"use_kl_loss": True, "kl_loss_coef": -1.0}, "kl_loss_coef must be >= 0"),
        ({"tis_low": 2.0, "tis_high": 2.0}, "tis_low/tis_high"),
        ({"correction_low": -0.1}, "correction_low/correction_high"),
        ({"correction": "no_colon"}, "module:function"),
        ({"loss_reduction": "constant"}, "constant_normalizer >= 1"),
        ({"constant_normalizer": 128}, "only used with loss_reduction=constant"),
        ({"entropy_coef": float("nan")}, "entropy_coef must be finite"),
    ],
)
def test_bad_values_raise(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AlgoConfig(**kwargs)


def test_valid_combinations_pass():
    AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.01, kl_estimator="low_var_kl", gamma=0.99)
    AlgoConfig(advantage_estimator="dr_grpo", loss_reduction="constant", constant_normalizer=1024)
    AlgoConfig(use_kl_loss=True, kl_loss_coef=0.0, dual_clip_c=3.0, use_tis=True, entropy_coef=-0.01)
    assert issubclass(ConfigError, ValueError)


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, miles.algo.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
