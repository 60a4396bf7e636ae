"""PPO-style clipped policy-gradient loss per token: asymmetric clip, dual clip, GSPO sequence ratio.

Tensor legend: B = samples, T = response tokens (right-padded); `_BT` per token, `_B` per sample.
`logprobs_BT` = log pi_theta (requires grad), `old_logprobs_BT` = log pi_old (no grad),
`adv_BT` = advantages, `mask_BT` = loss mask.

    ppo_kl = log pi_old - log pi                  ratio r = exp(clamp(-ppo_kl, -20, 20))
    pg     = max(-r A, -clip(r, 1 - eps_clip, 1 + eps_clip_high) A)
    dual clip (c > 1, only where A < 0):  pg = min(pg, -c A)
    GSPO: the token log-ratio is replaced by the sequence mean s_b = mean_t(log pi - log pi_old)
          over trained tokens, written as  sg(s_b) + log pi_t - sg(log pi_t)  (GSPO-token form):
          its value is the sequence ratio exp(s_b) on every token, and its gradient on token t is
          exp(s_b) * grad log pi_t, so a per-sample token mean reproduces the sequence-level
          GSPO gradient exp(s_b) * A * mean_t grad log pi_t exactly.

The result is per token (not reduced), so corrections (TIS) can weight it first; reduce with
miles.algo.reduction.
"""

from dataclasses import dataclass

import torch

from miles.algo.kl import safe_log_ratio


@dataclass(frozen=True, eq=False)
class PolicyLossOutput:
    """Per-token policy-gradient loss and the per-token indicators its metrics are made of."""

    loss_BT: torch.Tensor
    """Clipped policy-gradient loss per token (differentiable); not masked or reduced."""
    clipfrac_BT: torch.Tensor
    """1.0 where the clipped term was the active one (the PPO clip bit), else 0.0; detached."""
    dual_clipfrac_BT: torch.Tensor
    """1.0 where the dual clip capped the loss (A < 0), else 0.0; detached (all 0 when off)."""
    ppo_kl_BT: torch.Tensor
    """log pi_old - log pi per token (per sequence for GSPO); detached; its mean is the approx KL."""


def sequence_mean_log_ratio(
    logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """s_b = mean over trained tokens of (log pi - log pi_old); 0 for an all-masked sample. Shape [B]."""
    mask = mask_BT.to(logprobs_BT.dtype)
    return ((logprobs_BT - old_logprobs_BT) * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def gspo_log_ratio(
    logprobs_BT: torch.Tensor, old_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """GSPO-token log-ratio sg(s_b) + log pi_t - sg(log pi_t): value s_b, gradient d log pi_t."""
    seq_B = sequence_mean_log_ratio(logprobs_BT.detach(), old_logprobs_BT, mask_BT)
    return seq_B[:, None] + logprobs_BT - logprobs_BT.detach()


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float | None = None,
    dual_clip_c: float | None = None,
    sequence_level: bool = False,
) -> PolicyLossOutput:
    """Clipped surrogate loss per token (to be minimised).

    Args:
        eps_clip / eps_clip_high: clip range [1 - eps_clip, 1 + eps_clip_high] (high defaults to eps_clip).
        dual_clip_c: if set (> 1), caps the loss of negative-advantage tokens at -c * A.
        sequence_level: GSPO's per-sequence ratio (needs `mask_BT` to find each sequence's tokens).
    """
    if not logprobs_BT.shape == old_logprobs_BT.shape == adv_BT.shape == mask_BT.shape:
        raise ValueError(
            "policy_loss: logprobs, old_logprobs, advantages and mask must have one shape, got "
            f"{[tuple(t.shape) for t in (logprobs_BT, old_logprobs_BT, adv_BT, mask_BT)]}"
        )
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    eps_clip_high = eps_clip if eps_clip_high is None else eps_clip_high
    if sequence_level:
        log_ratio_BT = gspo_log_ratio(logprobs_BT, old_logprobs_BT, mask_BT)
    else:
        log_ratio_BT = logprobs_BT - old_logprobs_BT
    ratio_BT = safe_log_ratio(log_ratio_BT).exp()
    adv_BT = adv_BT.to(ratio_BT.dtype)
    unclipped_BT = -ratio_BT * adv_BT
    clipped_BT = -ratio_BT.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * adv_BT
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    clipfrac_BT = (clipped_BT > unclipped_BT).to(ratio_BT.dtype)
    dual_clipfrac_BT = torch.zeros_like(clipfrac_BT)
    if dual_clip_c is not None:
        cap_BT = -dual_clip_c * adv_BT
        capped_BT = (adv_BT < 0) & (cap_BT < loss_BT)
        loss_BT = torch.where(capped_BT, cap_BT, loss_BT)
        dual_clipfrac_BT = capped_BT.to(ratio_BT.dtype)
    return PolicyLossOutput(
        loss_BT=loss_BT,
        clipfrac_BT=clipfrac_BT.detach(),
        dual_clipfrac_BT=dual_clipfrac_BT.detach(),
        ppo_kl_BT=(-log_ratio_BT).detach(),
    )
