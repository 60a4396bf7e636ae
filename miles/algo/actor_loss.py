"""The actor loss of one micro-batch, composed from the pieces in miles.algo per `AlgoConfig`.

Tensor legend: B = samples, T = response tokens (right-padded); `_BT` per token, `_B` per sample.

    pg_BT   = policy_loss(log pi, log pi_old, A)              (clip / dual clip / GSPO ratio)
    pg_BT  *= TIS weights (algo.use_tis) * correction weights (algo.correction)
    loss    = R(pg_BT) - entropy_coef * R(H_BT) + kl_loss_coef * R(KL(pi || pi_ref))   [if use_kl_loss]

with R the configured reduction (miles.algo.reduction). Loss-term metrics (pg_loss, entropy_loss,
kl_loss, loss) use R; indicator metrics (clip fractions, ppo_kl, tis, ...) use R too, except that
"constant" is replaced by "sample_mean" for them. With global normalisers (num_samples,
num_tokens) every metric sums over micro-batches to its global value.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from miles.algo.config import AlgoConfig
from miles.algo.corrections import CorrectionInput, ImportanceCorrection, tis_weights
from miles.algo.kl import kl_estimate
from miles.algo.policy_loss import policy_loss
from miles.algo.reduction import reduce_loss


@dataclass(frozen=True, eq=False)
class ActorLossInput:
    """Per-token tensors of one micro-batch, all [B, T] and aligned to response tokens."""

    logprobs_BT: torch.Tensor
    """log pi_theta of the sampled tokens (requires grad)."""
    old_logprobs_BT: torch.Tensor
    """log pi_old: trainer forward pass before this rollout's updates (or the engine's, in bypass mode)."""
    advantages_BT: torch.Tensor
    """Advantages (miles.algo.advantages.compute_advantages)."""
    mask_BT: torch.Tensor
    """Loss mask: 1 = trained token; 0 = prompt-side, tool output or padding."""
    rollout_logprobs_BT: torch.Tensor | None = None
    """Engine log-probs; needed for TIS and corrections, and logged against old_logprobs_BT."""
    ref_logprobs_BT: torch.Tensor | None = None
    """Reference-model log-probs; needed when algo.use_kl_loss."""
    entropy_BT: torch.Tensor | None = None
    """Per-token entropy (miles.algo.entropy); needed when algo.entropy_coef != 0, else only logged."""
    num_samples: float | None = None
    """Global sample count to normalise by (default: B of this micro-batch)."""
    num_tokens: float | None = None
    """Global trained-token count for token_mean (default: this micro-batch's)."""
    sample_token_counts_B: torch.Tensor | None = None
    """Whole-sample trained-token counts for sample_mean when a sample is split across ranks."""


def actor_loss(
    cfg: AlgoConfig, inp: ActorLossInput, correction: ImportanceCorrection | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss to minimise and detached scalar metrics (keys without prefix, e.g. "pg_loss").

    `correction` is the resolved algo.correction plug-point (None when the field is empty).
    """
    mask_BT = inp.mask_BT
    reduce = partial(
        reduce_loss,
        mask_BT=mask_BT,
        mode=cfg.loss_reduction,
        constant_normalizer=cfg.constant_normalizer,
        num_samples=inp.num_samples,
        num_tokens=inp.num_tokens,
        sample_token_counts_B=inp.sample_token_counts_B,
    )
    # Indicator/diagnostic metrics are averages, so Dr.GRPO's constant normaliser would distort them.
    metric_mode = "sample_mean" if cfg.loss_reduction == "constant" else cfg.loss_reduction
    average = partial(reduce, mode=metric_mode)
    pg = policy_loss(
        inp.logprobs_BT,
        inp.old_logprobs_BT,
        inp.advantages_BT,
        mask_BT,
        eps_clip=cfg.eps_clip,
        eps_clip_high=cfg.eps_clip_high,
        dual_clip_c=cfg.dual_clip_c,
        sequence_level=cfg.sequence_level_ratio,
    )
    metrics: dict[str, torch.Tensor] = {
        "pg_clipfrac": average(pg.clipfrac_BT),
        "ppo_kl": average(pg.ppo_kl_BT),
    }
    if cfg.dual_clip_c is not None:
        metrics["pg_dual_clipfrac"] = average(pg.dual_clipfrac_BT)
    pg_loss_BT = pg.loss_BT * _correction_weights(cfg, inp, correction, average, metrics)
    pg_loss = reduce(pg_loss_BT)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.detach()

    if inp.entropy_BT is not None:
        entropy_loss = reduce(inp.entropy_BT)
        metrics["entropy_loss"] = entropy_loss.detach()
        if cfg.entropy_coef != 0:
            loss = loss - cfg.entropy_coef * entropy_loss
    elif cfg.entropy_coef != 0:
        raise ValueError(f"algo.entropy_coef={cfg.entropy_coef} needs ActorLossInput.entropy_BT")

    if cfg.use_kl_loss:
        if inp.ref_logprobs_BT is None:
            raise ValueError("algo.use_kl_loss needs ActorLossInput.ref_logprobs_BT")
        kl_loss = reduce(kl_estimate(inp.logprobs_BT, inp.ref_logprobs_BT, cfg.kl_estimator))
        metrics["kl_loss"] = kl_loss.detach()
        if cfg.kl_loss_coef != 0:
            loss = loss + cfg.kl_loss_coef * kl_loss

    metrics["loss"] = loss.detach()
    return loss, {key: value.detach() for key, value in metrics.items()}


def _correction_weights(
    cfg: AlgoConfig,
    inp: ActorLossInput,
    correction: ImportanceCorrection | None,
    average: Callable[[torch.Tensor], torch.Tensor],
    metrics: dict[str, torch.Tensor],
) -> torch.Tensor | float:
    """Product of the TIS and correction weights (1.0 when neither is on); fills their metrics."""
    weights: torch.Tensor | float = 1.0
    if inp.rollout_logprobs_BT is None:
        if cfg.use_tis or correction is not None:
            raise ValueError("algo.use_tis / algo.correction need ActorLossInput.rollout_logprobs_BT")
        return weights
    diff_BT = (inp.old_logprobs_BT.detach() - inp.rollout_logprobs_BT).abs()
    diff_BT = diff_BT.to(torch.promote_types(diff_BT.dtype, torch.float32))
    metrics["train_rollout_logprob_abs_diff"] = average(diff_BT)
    if cfg.use_tis:
        tis = tis_weights(inp.old_logprobs_BT, inp.rollout_logprobs_BT, low=cfg.tis_low, high=cfg.tis_high)
        metrics["tis"] = average(tis.weights_BT)
        metrics["tis_clipfrac"] = average(tis.clipfrac_BT)
        weights = tis.weights_BT
    if correction is not None:
        out = correction(
            CorrectionInput(
                old_logprobs_BT=inp.old_logprobs_BT.detach(),
                rollout_logprobs_BT=inp.rollout_logprobs_BT.detach(),
                mask_BT=inp.mask_BT,
                low=cfg.correction_low,
                high=cfg.correction_high,
            )
        )
        if out.weights_BT.shape != inp.mask_BT.shape:
            raise ValueError(
                f"correction returned weights of shape {tuple(out.weights_BT.shape)}, "
                f"expected {tuple(inp.mask_BT.shape)}"
            )
        metrics.update({key: value.detach() for key, value in out.metrics.items()})
        weights = out.weights_BT.detach() * weights
    return weights
