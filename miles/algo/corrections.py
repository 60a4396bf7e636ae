"""Train/inference mismatch corrections: TIS weights and the `ImportanceCorrection` plug-point.

Tensor legend: B = samples, T = response tokens (right-padded); `_BT` per token.
`old_logprobs_BT` = log pi_old from the trainer's forward pass, `rollout_logprobs_BT` = the
engine's log-probs of the same tokens. The engine and the trainer compute the "same" policy with
different kernels and precision, so their ratio w = pi_old / pi_rollout drifts from 1.

    TIS                     weight = clamp(exp(log pi_old - log pi_rollout), low, high)
    token_mask_rejection    weight = 1 where low <= w <= high, else 0 (the token is rejected)

Both produce detached per-token weights that multiply the per-token policy loss before reduction
(a rejected token keeps its place in the reduction denominator, as in the reference).
Custom corrections (sequence-level or geometric rejection, batch-normalised weights, ...) implement
`ImportanceCorrection` and are named in `algo.correction` as "module:function".
"""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from miles.algo.kl import safe_log_ratio


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    mask = mask_BT.to(x_BT.dtype)
    return (x_BT * mask).sum() / mask.sum().clamp_min(1.0)


def importance_ratio(old_logprobs_BT: torch.Tensor, rollout_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """w = pi_old / pi_rollout per token (log-ratio clamped to +-20), detached."""
    dtype = torch.promote_types(old_logprobs_BT.dtype, torch.float32)
    log_w_BT = old_logprobs_BT.detach().to(dtype) - rollout_logprobs_BT.detach().to(dtype)
    return safe_log_ratio(log_w_BT).exp()


@dataclass(frozen=True, eq=False)
class TISWeights:
    """Truncated importance-sampling weights and what they did."""

    weights_BT: torch.Tensor
    """clamp(pi_old / pi_rollout, low, high) per token; detached."""
    clipfrac_BT: torch.Tensor
    """1.0 where the clamp changed the ratio, else 0.0."""


def tis_weights(
    old_logprobs_BT: torch.Tensor, rollout_logprobs_BT: torch.Tensor, *, low: float, high: float
) -> TISWeights:
    """TIS: clamp(exp(log pi_old - log pi_rollout), low, high), per token."""
    if not 0 <= low < high:
        raise ValueError(f"TIS bounds must satisfy 0 <= low < high, got {low}, {high}")
    ratio_BT = importance_ratio(old_logprobs_BT, rollout_logprobs_BT)
    weights_BT = ratio_BT.clamp(low, high)
    return TISWeights(weights_BT=weights_BT, clipfrac_BT=(weights_BT != ratio_BT).to(ratio_BT.dtype))


@dataclass(frozen=True, eq=False)
class CorrectionInput:
    """What an importance correction sees for one micro-batch."""

    old_logprobs_BT: torch.Tensor
    """log pi_old (trainer forward pass before the update), detached."""
    rollout_logprobs_BT: torch.Tensor
    """log pi_rollout (engine log-probs of the same tokens)."""
    mask_BT: torch.Tensor
    """Loss mask (1 = trained token); padding and masked tokens are 0."""
    low: float
    """Lower bound from algo.correction_low."""
    high: float
    """Upper bound from algo.correction_high."""


@dataclass(frozen=True, eq=False)
class CorrectionOutput:
    """Per-token weights that multiply the policy loss, and scalar metrics about them."""

    weights_BT: torch.Tensor
    """Detached, >= 0; 0 rejects a token. Same shape as the input mask."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalar tensors, mask-averaged over the micro-batch (logged as "train/<key>")."""


class ImportanceCorrection(Protocol):
    """Reweights or rejects tokens whose rollout policy drifted from the trainer's old policy.

    Called once per micro-batch with detached inputs; must not change shapes and must return
    weights that are 0 wherever it wants a token ignored. Pure function of its input.
    """

    def __call__(self, inp: CorrectionInput) -> CorrectionOutput: ...


def token_mask_rejection(inp: CorrectionInput) -> CorrectionOutput:
    """Built-in MIS (IcePop-style): reject tokens whose ratio pi_old / pi_rollout is outside [low, high]."""
    ratio_BT = importance_ratio(inp.old_logprobs_BT, inp.rollout_logprobs_BT)
    keep_BT = ((ratio_BT >= inp.low) & (ratio_BT <= inp.high)).to(ratio_BT.dtype)
    return CorrectionOutput(
        weights_BT=keep_BT,
        metrics={
            "mis_reject_frac": _masked_mean(1.0 - keep_BT, inp.mask_BT),
            "mis_ratio_mean": _masked_mean(ratio_BT, inp.mask_BT),
        },
    )
