"""Advantage estimators: GRPO, Dr.GRPO, GSPO, REINFORCE++ and REINFORCE++-baseline.

Tensor legend:
    B  samples in the batch (all groups, flattened)
    T  response tokens, right-padded to the longest response; position t is response token t
    G  prompt groups (the n samples of one prompt share a group id)
    `rewards_B` is one scalar reward per sample, `group_ids_B` any integer id per sample
    (need not be contiguous), `mask_BT` the loss mask (1 = trained token, 0 = masked or padding),
    `kl_BT` a per-token KL estimate (see miles.algo.kl), `adv_BT` the per-token advantages.

Formulas (reference: Miles/slime `--advantage-estimator`):
    grpo, gspo        A = (R - mean_g(R)) / (std_g(R) + eps), std unbiased (Bessel), eps 1e-6;
                      a group of one sample gets A = 0. GSPO differs only in the loss (sequence ratio).
    dr_grpo           A = R - mean_g(R)  (no std: Dr.GRPO removes the difficulty bias).
    reinforce_plus_plus
                      r_t = -kl_coef * KL_t on trained tokens, plus R on the last trained token;
                      G_t = r_t + gamma * G_{t+1};  A = whiten(G) over all trained tokens of the batch.
    reinforce_plus_plus_baseline
                      A_t = (R - mean_g(R)) - kl_coef * KL_t;  A = whiten(A) over the batch.
    whiten(x)         (x - mean) / sqrt(var + 1e-8), mask-weighted mean and Bessel-corrected var.

Every output is zero at masked positions. Pass `process_group` to whiten across data-parallel
ranks (statistics are all-reduced; the result equals whitening the concatenated batch).
"""

import torch
import torch.distributed as dist

from miles.algo.config import AlgoConfig

GROUP_STD_EPS = 1e-6
"""Added to the group reward std before dividing (GRPO/GSPO), as in the reference."""
WHITEN_EPS = 1e-8
"""Added to the batch variance before the inverse square root (whitening)."""


def group_ids_for(
    num_groups: int, n_per_group: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Group ids [0,0,...,1,1,...] for rewards laid out as a flattened [num_groups, n_per_group] tensor."""
    return torch.arange(num_groups, device=device).repeat_interleave(n_per_group)


def group_normalized_rewards(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    *,
    std_normalize: bool,
    eps: float = GROUP_STD_EPS,
) -> torch.Tensor:
    """Per-sample scalar advantage R - mean_g(R), divided by (std_g(R) + eps) if `std_normalize`.

    Groups may differ in size (after filtering). std is the unbiased sample std of the group; a
    group of one sample has A = 0 (nothing to compare against).
    """
    if rewards_B.dim() != 1 or group_ids_B.shape != rewards_B.shape:
        raise ValueError(
            f"rewards_B and group_ids_B must be 1-D and equal in shape, got {tuple(rewards_B.shape)} "
            f"and {tuple(group_ids_B.shape)}; flatten [G, n] rewards and use group_ids_for(G, n)"
        )
    rewards_B = rewards_B.to(torch.promote_types(rewards_B.dtype, torch.float32))
    _, inverse_B = torch.unique(group_ids_B, return_inverse=True)
    num_groups = int(inverse_B.max().item()) + 1 if inverse_B.numel() else 0
    count_G = torch.zeros(num_groups, dtype=rewards_B.dtype, device=rewards_B.device)
    count_G.index_add_(0, inverse_B, torch.ones_like(rewards_B))
    sum_G = torch.zeros_like(count_G).index_add_(0, inverse_B, rewards_B)
    centered_B = rewards_B - (sum_G / count_G)[inverse_B]
    if not std_normalize:
        return centered_B
    sq_G = torch.zeros_like(count_G).index_add_(0, inverse_B, centered_B.square())
    var_G = sq_G / (count_G - 1).clamp_min(1)  # Bessel; a singleton group has var 0 (and A = 0)
    return centered_B / (var_G.sqrt()[inverse_B] + eps)


def broadcast_to_tokens(adv_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-sample advantages copied to every trained token; 0 at masked positions."""
    _check_mask(mask_BT, adv_B.shape[0])
    return adv_B[:, None] * mask_BT.to(adv_B.dtype)


def masked_whiten(
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps: float = WHITEN_EPS,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the trained tokens; var is Bessel-corrected; 0 where masked.

    With `process_group`, the sums are all-reduced first, so every rank whitens with the
    statistics of the whole data-parallel batch.
    """
    mask = mask_BT.to(values_BT.dtype)
    stats = torch.stack([(values_BT * mask).sum(), (values_BT.square() * mask).sum(), mask.sum()])
    if process_group is not None:
        dist.all_reduce(stats, group=process_group)
    total, total_sq, count = stats.unbind()
    if count.item() == 0:
        raise ValueError("masked_whiten: the mask selects no tokens (across the whole group)")
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    if count.item() >= 2:
        var = var * count / (count - 1)
    return (values_BT - mean) * torch.rsqrt(var + eps) * mask


def grpo_advantages(
    rewards_B: torch.Tensor, group_ids_B: torch.Tensor, mask_BT: torch.Tensor, *, eps: float = GROUP_STD_EPS
) -> torch.Tensor:
    """GRPO (and GSPO): group mean/std-normalised reward on every trained token."""
    adv_B = group_normalized_rewards(rewards_B, group_ids_B, std_normalize=True, eps=eps)
    return broadcast_to_tokens(adv_B, mask_BT)


def dr_grpo_advantages(
    rewards_B: torch.Tensor, group_ids_B: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Dr.GRPO: group-mean-centred reward (no std division) on every trained token."""
    adv_B = group_normalized_rewards(rewards_B, group_ids_B, std_normalize=False)
    return broadcast_to_tokens(adv_B, mask_BT)


def discounted_returns(token_rewards_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} along the token axis (G after the last position is 0)."""
    returns_BT = torch.zeros_like(token_rewards_BT)
    running_B = torch.zeros_like(token_rewards_BT[:, 0])
    for t in range(token_rewards_BT.shape[1] - 1, -1, -1):
        running_B = token_rewards_BT[:, t] + gamma * running_B
        returns_BT[:, t] = running_B
    return returns_BT


def reinforce_pp_advantages(
    rewards_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """REINFORCE++: discounted token returns of (-kl_coef * KL, + R at the last trained token), whitened.

    Masked positions carry no reward (no KL shaping, no R) but the return still flows back
    through them, discounted by gamma per position. A sample with no trained token is an error.
    """
    _check_mask(mask_BT, rewards_B.shape[0])
    dtype = torch.promote_types(rewards_B.dtype, torch.float32)
    mask = mask_BT.to(dtype)
    if (mask.sum(dim=1) == 0).any():
        raise ValueError("reinforce_plus_plus: a sample has no trained token (all-zero loss mask row)")
    token_rewards_BT = torch.zeros_like(mask) if kl_BT is None else -kl_coef * kl_BT.to(dtype) * mask
    positions_BT = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last_B = torch.where(mask > 0, positions_BT, -1).amax(dim=1)
    token_rewards_BT[torch.arange(mask.shape[0], device=mask.device), last_B] += rewards_B.to(dtype)
    return masked_whiten(discounted_returns(token_rewards_BT, gamma), mask, process_group=process_group)


def reinforce_pp_baseline_advantages(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """REINFORCE++-baseline: (R - group mean) - kl_coef * KL_t on trained tokens, whitened over the batch."""
    adv_B = group_normalized_rewards(rewards_B, group_ids_B, std_normalize=False)
    adv_BT = broadcast_to_tokens(adv_B, mask_BT)
    if kl_BT is not None:
        adv_BT = adv_BT - kl_coef * kl_BT.to(adv_BT.dtype) * mask_BT.to(adv_BT.dtype)
    return masked_whiten(adv_BT, mask_BT, process_group=process_group)


def compute_advantages(
    cfg: AlgoConfig,
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_BT: torch.Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token advantages for `cfg.advantage_estimator` (no gradient; call under any autograd mode).

    `kl_BT` (KL of the rollout policy to the reference, e.g. kl_estimate(old, ref, cfg.kl_estimator))
    is required by the REINFORCE++ estimators when cfg.kl_coef != 0. With cfg.normalize_advantages
    the GRPO-family advantages are whitened too; the REINFORCE++ family always is.
    """
    with torch.no_grad():
        estimator = cfg.advantage_estimator
        if estimator.startswith("reinforce") and cfg.kl_coef != 0 and kl_BT is None:
            raise ValueError(f"{estimator} with algo.kl_coef={cfg.kl_coef} needs kl_BT (KL to the reference)")
        if estimator in ("grpo", "gspo"):
            adv_BT = grpo_advantages(rewards_B, group_ids_B, mask_BT, eps=cfg.group_std_eps)
        elif estimator == "dr_grpo":
            adv_BT = dr_grpo_advantages(rewards_B, group_ids_B, mask_BT)
        elif estimator == "reinforce_plus_plus":
            return reinforce_pp_advantages(
                rewards_B, mask_BT, kl_BT=kl_BT, kl_coef=cfg.kl_coef, gamma=cfg.gamma,
                process_group=process_group,
            )
        elif estimator == "reinforce_plus_plus_baseline":
            return reinforce_pp_baseline_advantages(
                rewards_B, group_ids_B, mask_BT, kl_BT=kl_BT, kl_coef=cfg.kl_coef, process_group=process_group
            )
        else:
            raise AssertionError(f"AlgoConfig let through unknown estimator {estimator!r}")
        if cfg.normalize_advantages:
            adv_BT = masked_whiten(adv_BT, mask_BT, process_group=process_group)
        return adv_BT


def _check_mask(mask_BT: torch.Tensor, num_samples: int) -> None:
    if mask_BT.dim() != 2 or mask_BT.shape[0] != num_samples:
        raise ValueError(f"mask_BT must be [B, T] with B = {num_samples} samples, got {tuple(mask_BT.shape)}")
