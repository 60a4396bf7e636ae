"""The math every log-prob + entropy implementation shares: the input contract, vocabulary
partials and how they combine, and the gradient with respect to the logits.

Legend: N tokens (batch x sequence, flattened), H hidden size, V vocabulary (this rank's shard
when the vocabulary is tensor-parallel), P vocabulary parts (tiles in a kernel, or TP ranks).

Definitions (the conventions of miles/trainer/logprobs.py):

    z_NV      = (hidden_NH @ weight_VH^T) / T          T = the rollout temperature
    logprob_N = z[n, target_n] - logsumexp_v z[n, v]   log softmax(logits / T)[target]
    entropy_N = -sum_v p log p,  p = softmax_v(z)      entropy of softmax(logits / T)

Partials. A part k of the vocabulary (a tile of columns, or one TP rank's shard) yields per token

    m_k = max_v z_v                       s_k = sum_v exp(z_v - m_k)
    a_k = sum_v exp(z_v - m_k) (z_v - m_k)  t_k = z_target if the target is in part k, else 0

and parts combine exactly (this is also the online update of a kernel walking vocab tiles):

    M = max_k m_k,  w_k = exp(m_k - M)
    s = sum_k w_k s_k,  a = sum_k w_k (a_k + (m_k - M) s_k),  t = sum_k t_k
    logsumexp = M + log s,  logprob = t - logsumexp,  entropy = log s - a / s

Since a is taken relative to the running max, entropy never subtracts two large numbers.

Tensor parallel (vocab-sharded output layer, `group=` of the implementations): each rank computes
its shard's (m, s, a, t) with the same kernel (targets shifted by the shard's first row, so a
target outside the shard is never picked), then one all-reduce MAX of m gives M, and one
all-reduce SUM of the stacked [w s, w (a + (m - M) s), t, found] (a [4, N] tensor; found = 1 where
the target lies in this shard) gives s, a, t on every rank, and checks that exactly one shard held
each target (`all_reduce_partials`). The backward needs only logsumexp_N and entropy_N (already
global): every rank forms g_z for its shard below, computes d weight of its shard locally, and
d hidden (a partial sum over the shards) is all-reduced (SUM) over the group, as megatron's
column-parallel output layer does in its backward.

Gradient (with g_lp, g_H the upstream gradients of logprob and entropy, log p = z - logsumexp):

    d logprob / d z_v = onehot_v - p_v
    d entropy / d z_v = -p_v (z_v - sum_u p_u z_u) = -p_v (log p_v + entropy)
    g_z = g_lp onehot - p (g_lp + g_H (log p + entropy)),   d logits = g_z / T
    d hidden = d logits @ weight,   d weight = d logits^T @ hidden
"""

import torch
import torch.distributed as dist

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_inputs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor, temperature: float,
                 chunk_size: int, sharded: bool = False) -> None:
    """Raise ValueError naming the problem when the inputs break the contract.

    Checks shapes, dtypes and devices, T > 0, chunk_size > 0 and 0 <= target < V (one small
    reduction on the device: a bad target would read out of bounds inside a kernel). With
    `sharded` (weight_VH is one shard of a vocabulary split over a process group) only
    target >= 0 is checked here; `all_reduce_partials` checks that some shard holds each target.
    """
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden_NH.shape)} and "
                         f"{tuple(weight_VH.shape)}: flatten batch and sequence into N first")
    if hidden_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"hidden size differs: hidden is [N, {hidden_NH.shape[1]}], weight is "
                         f"[V, {weight_VH.shape[1]}]")
    if targets_N.shape != (hidden_NH.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden_NH.shape[0]}], got {tuple(targets_N.shape)}")
    if targets_N.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets_N.dtype}")
    for name, t in (("hidden", hidden_NH), ("weight", weight_VH)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {[str(d) for d in SUPPORTED_DTYPES]}")
    if not (hidden_NH.device == weight_VH.device == targets_N.device):
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden_NH.device}, "
                         f"{weight_VH.device}, {targets_N.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if sharded:
        if targets_N.numel() and bool((targets_N < 0).any()):
            raise ValueError(f"targets must be token ids >= 0, found {targets_N[targets_N < 0][:5].tolist()}")
        return
    if targets_N.numel() and bool(((targets_N < 0) | (targets_N >= weight_VH.shape[0])).any()):
        bad = targets_N[(targets_N < 0) | (targets_N >= weight_VH.shape[0])][:5].tolist()
        raise ValueError(f"targets must be token ids in [0, {weight_VH.shape[0]}), found {bad}: map padding "
                         f"to a real token id and mask its result instead")


def combine_partials(m_PN: torch.Tensor, s_PN: torch.Tensor, a_PN: torch.Tensor,
                     t_PN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge P vocabulary parts' (m, s, a, t) into one (m_N, s_N, a_N, t_N) (see the module doc)."""
    m_N = m_PN.amax(dim=0)
    w_PN = torch.exp(m_PN - m_N)
    s_N = (w_PN * s_PN).sum(dim=0)
    a_N = (w_PN * (a_PN + (m_PN - m_N) * s_PN)).sum(dim=0)
    return m_N, s_N, a_N, t_PN.sum(dim=0)


def all_reduce_partials(m_N: torch.Tensor, s_N: torch.Tensor, a_N: torch.Tensor, t_N: torch.Tensor,
                        inside_N: torch.Tensor,
                        group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine every rank's (m, s, a, t) of its vocabulary shard over `group` (module doc): the
    global (m_N, s_N, a_N, t_N), identical on all ranks. `inside_N` marks the tokens whose target
    lies in this rank's shard; raises ValueError (on every rank alike) unless exactly one shard
    holds each target."""
    max_N = m_N.clone()
    dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
    w_N = torch.exp(m_N - max_N)
    sums_4N = torch.stack([w_N * s_N, w_N * (a_N + (m_N - max_N) * s_N), t_N, inside_N.to(s_N.dtype)])
    dist.all_reduce(sums_4N, group=group)
    if sums_4N.shape[1] and bool((sums_4N[3] != 1).any()):
        bad = (sums_4N[3] != 1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"targets at token positions {bad} lie in no shard of the vocabulary (or in several): "
                         f"targets must be token ids below the full vocabulary size, and the shards' vocab_start "
                         f"must tile it")
    return max_N, sums_4N[0], sums_4N[1], sums_4N[2]


def finish_partials(m_N: torch.Tensor, s_N: torch.Tensor, a_N: torch.Tensor,
                    t_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob_N, entropy_N, logsumexp_N) of the combined partials of the whole vocabulary."""
    log_s_N = torch.log(s_N)
    lse_N = m_N + log_s_N
    return t_N - lse_N, log_s_N - a_N / s_N, lse_N


def partials_of_logits(z_CV: torch.Tensor, targets_C: torch.Tensor,
                       vocab_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, s, a, t) of one block of scaled logits z_CV covering columns [vocab_start, vocab_start + V)."""
    m_C = z_CV.amax(dim=-1)
    shifted_CV = z_CV - m_C.unsqueeze(-1)
    exp_CV = shifted_CV.exp()
    s_C = exp_CV.sum(dim=-1)
    a_C = (exp_CV * shifted_CV).sum(dim=-1)
    local_C = targets_C - vocab_start
    inside_C = (local_C >= 0) & (local_C < z_CV.shape[1])
    picked_C = z_CV.gather(1, local_C.clamp(0, z_CV.shape[1] - 1).long().unsqueeze(1)).squeeze(1)
    return m_C, s_C, a_C, torch.where(inside_C, picked_C, torch.zeros_like(picked_C))


def grad_scaled_logits(z_CV: torch.Tensor, targets_C: torch.Tensor, vocab_start: int, lse_C: torch.Tensor,
                       entropy_C: torch.Tensor, g_lp_C: torch.Tensor, g_ent_C: torch.Tensor) -> torch.Tensor:
    """g_z for one block of scaled logits (module doc); divide by T for the gradient of the logits."""
    logp_CV = z_CV - lse_C.unsqueeze(-1)
    p_CV = logp_CV.exp()
    g_CV = -p_CV * (g_lp_C.unsqueeze(-1) + g_ent_C.unsqueeze(-1) * (logp_CV + entropy_C.unsqueeze(-1)))
    local_C = (targets_C - vocab_start).long()
    inside_C = (local_C >= 0) & (local_C < z_CV.shape[1])
    rows_C = torch.arange(z_CV.shape[0], device=z_CV.device)[inside_C]
    g_CV[rows_C, local_C[inside_C]] += g_lp_C[inside_C]
    return g_CV
