"""Loss reduction: how per-token losses become one scalar.

Tensor legend: B = samples, T = response tokens (right-padded); `x_BT` a per-token quantity,
`mask_BT` the loss mask (1 = trained token). Masked positions never contribute.

    token_mean   sum_bt x*m / N_tokens                          (every token weighs the same)
    sample_mean  (1 / N_samples) sum_b [ sum_t x*m / max(L_b, 1) ]   (every sample weighs the same)
    constant     sum_bt x*m / (N_samples * C)                   (Dr.GRPO: C = a fixed token budget)

By default N_tokens = mask.sum(), N_samples = B and L_b = mask[b].sum(). A caller that splits the
global batch into micro-batches or across ranks passes the global counts instead
(`num_tokens`, `num_samples`, and `sample_token_counts_B` for a sample split across
context-parallel ranks), so that summing the micro-batch results gives the global reduction.
"""

import torch

from miles.algo.config import LOSS_REDUCTIONS


def reduce_token_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor, *, num_tokens: float | None = None) -> torch.Tensor:
    """Sum over trained tokens divided by the token count (at least 1)."""
    mask = mask_BT.to(x_BT.dtype)
    total = (x_BT * mask).sum()
    if num_tokens is None:
        return total / mask.sum().clamp_min(1.0)
    return total / max(float(num_tokens), 1.0)


def reduce_sample_mean(
    x_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    num_samples: float | None = None,
    sample_token_counts_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over samples of each sample's token mean; an all-masked sample contributes 0."""
    mask = mask_BT.to(x_BT.dtype)
    counts_B = mask.sum(dim=1) if sample_token_counts_B is None else sample_token_counts_B.to(x_BT.dtype)
    per_sample_B = (x_BT * mask).sum(dim=1) / counts_B.clamp_min(1.0)
    denom = x_BT.shape[0] if num_samples is None else num_samples
    return per_sample_B.sum() / max(float(denom), 1.0)


def reduce_constant(
    x_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    constant_normalizer: int,
    num_samples: float | None = None,
) -> torch.Tensor:
    """Dr.GRPO: token sum / (samples x constant_normalizer), independent of response lengths."""
    if constant_normalizer < 1:
        raise ValueError(f"constant_normalizer must be >= 1, got {constant_normalizer}")
    denom = x_BT.shape[0] if num_samples is None else num_samples
    return (x_BT * mask_BT.to(x_BT.dtype)).sum() / (max(float(denom), 1.0) * constant_normalizer)


def reduce_loss(
    x_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    mode: str,
    *,
    constant_normalizer: int | None = None,
    num_samples: float | None = None,
    num_tokens: float | None = None,
    sample_token_counts_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce `x_BT` with one of LOSS_REDUCTIONS (see the module docstring)."""
    if x_BT.shape != mask_BT.shape:
        raise ValueError(f"x_BT {tuple(x_BT.shape)} and mask_BT {tuple(mask_BT.shape)} differ in shape")
    if mode == "token_mean":
        return reduce_token_mean(x_BT, mask_BT, num_tokens=num_tokens)
    if mode == "sample_mean":
        return reduce_sample_mean(
            x_BT, mask_BT, num_samples=num_samples, sample_token_counts_B=sample_token_counts_B
        )
    if mode == "constant":
        if constant_normalizer is None:
            raise ValueError("loss reduction 'constant' needs constant_normalizer")
        return reduce_constant(x_BT, mask_BT, constant_normalizer=constant_normalizer, num_samples=num_samples)
    raise ValueError(f"unknown loss reduction {mode!r}; valid: {', '.join(LOSS_REDUCTIONS)}")
