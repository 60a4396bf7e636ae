"""Entropy of the sampling distribution softmax(logits / temperature), stable and shardable.

Tensor legend: B = samples, T = tokens, V = vocabulary (or one vocabulary shard); `_BT1` keeps a
trailing singleton so partials broadcast against `_BTV`.

H = log sum_v exp(z_v) - sum_v p_v z_v  with z = logits / temperature and p = softmax(z).
Written in terms of three per-token partials (max m, S = sum exp(z - m), W = sum exp(z - m) z),
H = m + log S - W / S, so a tensor-parallel caller can compute partials on its vocabulary shard
and combine them (here: `entropy_from_partials`; across ranks: all-reduce MAX of m, then SUM of
the rescaled S and W). The max is detached: H does not depend on the shift, so the gradient
through the remaining terms is exact.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class EntropyPartials:
    """Per-token sufficient statistics of one vocabulary shard."""

    max_BT1: torch.Tensor
    """Detached max of z over the shard."""
    sum_exp_BT1: torch.Tensor
    """sum_v exp(z_v - max)."""
    sum_exp_z_BT1: torch.Tensor
    """sum_v exp(z_v - max) * z_v."""


def _scaled(logits_BTV: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(logits_BTV.dtype, torch.float32)  # fp32 math for bf16/fp16 logits
    return logits_BTV.to(dtype) / temperature


def entropy_partials(logits_BTV: torch.Tensor, temperature: float = 1.0) -> EntropyPartials:
    """Partials of one vocabulary shard (or of the full vocabulary)."""
    z_BTV = _scaled(logits_BTV, temperature)
    max_BT1 = z_BTV.detach().amax(dim=-1, keepdim=True)
    # A shard whose entries are all -inf has max -inf; shift it by 0 instead (its sums are 0).
    shift_BT1 = torch.where(torch.isfinite(max_BT1), max_BT1, torch.zeros_like(max_BT1))
    exp_BTV = torch.exp(z_BTV - shift_BT1)
    # Vocabulary entries masked to -inf contribute p * z = 0 * -inf; count them as 0 (and keep
    # NaN out of the backward pass) by zeroing z there before the product.
    finite_z_BTV = z_BTV.masked_fill(~torch.isfinite(z_BTV), 0.0)
    return EntropyPartials(
        max_BT1=max_BT1,
        sum_exp_BT1=exp_BTV.sum(dim=-1, keepdim=True),
        sum_exp_z_BT1=(exp_BTV * finite_z_BTV).sum(dim=-1, keepdim=True),
    )


def entropy_from_partials(parts: Sequence[EntropyPartials]) -> torch.Tensor:
    """Combine the partials of disjoint vocabulary shards into the per-token entropy H_BT."""
    if not parts:
        raise ValueError("entropy_from_partials needs at least one shard")
    max_BT1 = parts[0].max_BT1
    for part in parts[1:]:
        max_BT1 = torch.maximum(max_BT1, part.max_BT1)
    sum_exp_BT1 = sum(p.sum_exp_BT1 * torch.exp(p.max_BT1 - max_BT1) for p in parts)
    sum_exp_z_BT1 = sum(p.sum_exp_z_BT1 * torch.exp(p.max_BT1 - max_BT1) for p in parts)
    entropy_BT1 = max_BT1 + torch.log(sum_exp_BT1) - sum_exp_z_BT1 / sum_exp_BT1
    return entropy_BT1.squeeze(-1)


def entropy_from_logits(logits_BTV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy (nats) of softmax(logits / temperature); float32 or float64 result.

    Differentiable. Matches the distribution the engine samples from when `temperature` is the
    rollout temperature (top-p/top-k are not applied, as for logprobs).
    """
    return entropy_from_partials([entropy_partials(logits_BTV, temperature)])
