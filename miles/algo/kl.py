"""Per-token KL(pi || pi_ref) estimators from sampled-token log-probs (Schulman's k1/k2/k3).

Tensor legend: B = samples in the batch, T = response tokens (padded); `*_BT` is per token.
Every function here is elementwise, so it also works on packed `[1, T_total]` streams.

With log r = log pi_ref - log pi (tokens sampled from pi):
    k1 = -log r = log pi - log pi_ref               unbiased, high variance, can be negative
    k2 = (log r)^2 / 2                              biased, low variance, >= 0
    k3 = r - 1 - log r                              unbiased, low variance, >= 0
    low_var_kl = k3 with log r clamped to [-20, 20] (NaN -> 0) and the result clamped to [-10, 10]
"""

import torch

from miles.algo.config import KL_ESTIMATORS

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to +-LOG_RATIO_CLAMP before exp(), so exp() stays finite in fp32."""
LOW_VAR_KL_CLAMP = 10.0
"""low_var_kl results are clamped to +-LOW_VAR_KL_CLAMP."""


def safe_log_ratio(log_ratio_BT: torch.Tensor) -> torch.Tensor:
    """NaN -> 0, +-inf -> +-20, then clamp to [-20, 20]: a log-ratio that is safe to exp()."""
    log_ratio_BT = torch.nan_to_num(log_ratio_BT, nan=0.0, posinf=LOG_RATIO_CLAMP, neginf=-LOG_RATIO_CLAMP)
    return log_ratio_BT.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_estimate(
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    estimator: str,
    importance_ratio_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens.

    Args:
        logprobs_BT: log pi of the sampled tokens (may require grad).
        ref_logprobs_BT: log pi_ref of the same tokens.
        estimator: one of KL_ESTIMATORS.
        importance_ratio_BT: optional pi/pi_old weight that makes the estimate unbiased when the
            tokens came from pi_old rather than pi (DeepSeek-V3.2 "unbiased KL"); pass it detached.

    Returns the estimate in float32 (float64 if the inputs are float64), same shape as the inputs.
    Masking is the caller's job (reduce with the loss mask).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    dtype = torch.promote_types(logprobs_BT.dtype, torch.float32)
    log_ratio_BT = logprobs_BT.to(dtype) - ref_logprobs_BT.to(dtype)  # log pi - log pi_ref
    if estimator == "k1":
        kl_BT = log_ratio_BT
    elif estimator == "k2":
        kl_BT = log_ratio_BT.square() / 2.0
    else:
        neg_BT = -log_ratio_BT  # log r = log pi_ref - log pi
        if estimator == "low_var_kl":
            neg_BT = safe_log_ratio(neg_BT)
        kl_BT = neg_BT.exp() - 1.0 - neg_BT
    if importance_ratio_BT is not None:
        kl_BT = importance_ratio_BT.to(dtype) * kl_BT
    if estimator == "low_var_kl":
        kl_BT = kl_BT.clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    return kl_BT
