"""Configuration of the RL algorithm: advantage estimator, policy loss, corrections, KL, entropy.

Torch-free, so recipes parse without importing torch; the formulas live in the sibling modules.
"""

import math
from dataclasses import dataclass

from miles.errors import ConfigError

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOSS_REDUCTIONS = ("token_mean", "sample_mean", "constant")


@dataclass(frozen=True)
class AlgoConfig:
    """How advantages and the actor loss are computed from a batch of scored samples."""

    advantage_estimator: str = "grpo"
    """One of grpo, dr_grpo, gspo, reinforce_plus_plus, reinforce_plus_plus_baseline; gspo also
    switches the policy loss to the sequence-level (geometric-mean) ratio."""
    group_std_eps: float = 1e-6
    """Added to the group reward std before dividing (grpo, gspo)."""
    normalize_advantages: bool = False
    """Also whiten grpo/dr_grpo/gspo advantages over the batch (REINFORCE++ variants always whiten)."""
    gamma: float = 1.0
    """Discount of token returns (reinforce_plus_plus), in [0, 1]."""
    eps_clip: float = 0.2
    """PPO clip: the ratio is clipped below at 1 - eps_clip."""
    eps_clip_high: float | None = None
    """PPO clip above at 1 + eps_clip_high (DAPO clip-higher, e.g. 0.28); None = eps_clip."""
    dual_clip_c: float | None = None
    """Dual-clip bound c > 1: for negative advantages the loss is capped at -c * A; None = off."""
    kl_coef: float = 0.0
    """Reward-level KL penalty folded into the advantages (reinforce_plus_plus[_baseline] only)."""
    use_kl_loss: bool = False
    """Add kl_loss_coef * KL(pi || pi_ref) to the loss (needs reference log-probs); coef 0 still logs it."""
    kl_loss_coef: float = 0.0
    """Weight of the KL loss term."""
    kl_estimator: str = "k1"
    """KL estimator for the KL loss and the reward-level KL: k1, k2, k3 or low_var_kl (clamped k3)."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * H (0 = entropy only logged, no gradient needed)."""
    use_tis: bool = False
    """Truncated importance sampling: weight each token's loss by clamp(pi_old / pi_rollout, low, high)."""
    tis_low: float = 0.0
    """Lower clamp of the TIS weight."""
    tis_high: float = 2.0
    """Upper clamp of the TIS weight."""
    correction: str = ""
    """Optional plug-point "module:function" (an ImportanceCorrection) applied per token after TIS,
    e.g. "miles.algo.corrections:token_mask_rejection"; empty = none."""
    correction_low: float = 0.5
    """Lower bound handed to the correction plug-point (token_mask_rejection masks ratios below it)."""
    correction_high: float = 5.0
    """Upper bound handed to the correction plug-point (token_mask_rejection masks ratios above it)."""
    loss_reduction: str = "sample_mean"
    """token_mean (all tokens / token count), sample_mean (mean of per-sample token means) or
    constant (Dr.GRPO: token sum / (samples x constant_normalizer))."""
    constant_normalizer: int | None = None
    """Tokens per sample for loss_reduction=constant (usually the max response length)."""

    def __post_init__(self) -> None:
        _check_choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        if self.eps_clip_high is None:
            object.__setattr__(self, "eps_clip_high", self.eps_clip)
        if not 0 <= self.eps_clip < 1:
            raise ConfigError(f"algo.eps_clip must be in [0, 1), got {self.eps_clip}")
        if self.eps_clip_high < 0:
            raise ConfigError(f"algo.eps_clip_high must be >= 0, got {self.eps_clip_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ConfigError(f"algo.dual_clip_c must be > 1 (or unset), got {self.dual_clip_c}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"algo.gamma must be in [0, 1], got {self.gamma}")
        if self.group_std_eps <= 0:
            raise ConfigError(f"algo.group_std_eps must be > 0, got {self.group_std_eps}")
        for name in ("kl_coef", "kl_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"algo.{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_coef and not self.advantage_estimator.startswith("reinforce_plus_plus"):
            raise ConfigError(
                f"algo.kl_coef (reward-level KL) only applies to reinforce_plus_plus[_baseline], not "
                f"{self.advantage_estimator}; use algo.use_kl_loss with algo.kl_loss_coef instead"
            )
        if self.kl_loss_coef and not self.use_kl_loss:
            raise ConfigError("algo.kl_loss_coef is set but algo.use_kl_loss is false; set use_kl_loss: true")
        if not math.isfinite(self.entropy_coef):
            raise ConfigError(f"algo.entropy_coef must be finite, got {self.entropy_coef}")
        _check_bounds("tis", self.tis_low, self.tis_high)
        _check_bounds("correction", self.correction_low, self.correction_high)
        if self.correction and ":" not in self.correction:
            raise ConfigError(f'algo.correction must be "module:function", got {self.correction!r}')
        if self.loss_reduction == "constant":
            if self.constant_normalizer is None or self.constant_normalizer < 1:
                raise ConfigError(
                    "algo.loss_reduction=constant needs algo.constant_normalizer >= 1 (tokens per sample, "
                    f"usually the max response length), got {self.constant_normalizer}"
                )
        elif self.constant_normalizer is not None:
            raise ConfigError(
                "algo.constant_normalizer is only used with loss_reduction=constant, "
                f"not {self.loss_reduction}"
            )

    @property
    def sequence_level_ratio(self) -> bool:
        """True when the policy loss uses GSPO's per-sequence ratio."""
        return self.advantage_estimator == "gspo"


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"algo.{name}: unknown value {value!r}; valid: {', '.join(valid)}")


def _check_bounds(prefix: str, low: float, high: float) -> None:
    if not 0 <= low < high:
        raise ConfigError(f"algo.{prefix}_low/{prefix}_high must satisfy 0 <= low < high, got {low}, {high}")
