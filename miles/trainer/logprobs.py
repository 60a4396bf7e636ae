"""Per-token log-probs and entropy of response tokens from vocab-parallel logits.

Legend: B batch (samples in a micro-batch), S padded sequence length, V vocabulary size,
Vp this TP rank's vocabulary slice (V / tp_size), R a sample's response length.

Conventions:
- The logits at position t predict token t+1, so the log-prob of token t comes from the logits at
  position t-1; `PaddedBatch.targets_BS[:, t]` is token t+1 and `response_mask_BS[:, t]` marks
  the positions whose target is a response token.
- Temperature: both quantities use `logits / T`, the distribution the rollout engine sampled
  from (SGLang returns log_softmax(logits / T) of the sampled token).
- Results are fp32 and differentiable with respect to the logits.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PaddedBatch:
    """A right-padded micro-batch of prompt+response sequences, ready for GPTModel.forward."""

    input_ids_BS: torch.Tensor
    """Token ids, padded on the right with the pad id."""
    position_ids_BS: torch.Tensor
    """0..S-1 on every row (right padding keeps real positions unchanged)."""
    attention_mask_11SS: torch.Tensor | None
    """None means causal (SDPACoreAttention); else a bool causal mask, True = masked (Megatron)."""
    targets_BS: torch.Tensor
    """targets_BS[:, t] = input_ids_BS[:, t + 1] (pad id at the last position)."""
    response_mask_BS: torch.Tensor
    """True where targets_BS is a response token."""
    prompt_lens: tuple[int, ...]
    """Prompt length of each sample."""
    response_lens: tuple[int, ...]
    """Response length of each sample."""


def causal_mask_11SS(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron-convention causal mask: [1, 1, S, S] bool, True above the diagonal (masked)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


def build_padded_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    pad_to_multiple_of: int = 1,
    explicit_mask: bool = False,
    device: torch.device | str = "cpu",
) -> PaddedBatch:
    """Right-pad prompt+response token lists into one batch.

    `explicit_mask=True` builds the causal mask tensor (needed by megatron's DotProductAttention;
    SDPACoreAttention treats None as causal and is faster without it).
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response per prompt and at least one sample, got {len(prompts)} "
                         f"prompts and {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    seq_len = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids_BS = torch.full((len(prompts), seq_len), pad_id, dtype=torch.long)
    response_mask_BS = torch.zeros((len(prompts), seq_len), dtype=torch.bool)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids_BS[b, : lengths[b]] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        response_mask_BS[b, len(prompt) - 1 : lengths[b] - 1] = True
    targets_BS = torch.full_like(input_ids_BS, pad_id)
    targets_BS[:, :-1] = input_ids_BS[:, 1:]
    position_ids_BS = torch.arange(seq_len, dtype=torch.long).expand(len(prompts), seq_len).contiguous()
    return PaddedBatch(
        input_ids_BS=input_ids_BS.to(device),
        position_ids_BS=position_ids_BS.to(device),
        attention_mask_11SS=causal_mask_11SS(seq_len, device) if explicit_mask else None,
        targets_BS=targets_BS.to(device),
        response_mask_BS=response_mask_BS.to(device),
        prompt_lens=tuple(len(p) for p in prompts),
        response_lens=tuple(len(r) for r in responses),
    )


def split_responses(values_BS: torch.Tensor, batch: PaddedBatch) -> list[torch.Tensor]:
    """Per-sample response values [R] (e.g. log-probs) from per-position values [B, S]."""
    return [values_BS[b, p - 1 : p - 1 + r] for b, (p, r) in enumerate(zip(batch.prompt_lens, batch.response_lens))]


def _tp_group(tp_group):
    from megatron.core import parallel_state as mpu

    return tp_group if tp_group is not None else mpu.get_tensor_model_parallel_group()


def token_logprobs(logits_BSVp: torch.Tensor, targets_BS: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] over the full (TP-sharded) vocabulary -> [B, S] fp32.

    Uses megatron's vocab_parallel_cross_entropy on megatron's TP group. That function
    overwrites its input in place, so it gets a fresh scaled copy; `logits_BSVp` is untouched.
    """
    from megatron.core import tensor_parallel

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled_BSVp = logits_BSVp.float() / temperature  # always a new tensor, even for T == 1
    return -tensor_parallel.vocab_parallel_cross_entropy(scaled_BSVp, targets_BS)


def token_entropy(logits_BSVp: torch.Tensor, temperature: float = 1.0, tp_group=None) -> torch.Tensor:
    """Entropy of softmax(logits / T) over the full (TP-sharded) vocabulary -> [B, S] fp32.

    H = log Σ exp(z - m) - Σ exp(z - m)(z - m) / Σ exp(z - m), with m the global max (no gradient),
    and the two sums all-reduced over the TP group (forward all-reduce, identity backward).
    """
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    group = _tp_group(tp_group)
    z_BSVp = logits_BSVp.float() / temperature
    max_BS = z_BSVp.detach().amax(dim=-1)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(max_BS, op=dist.ReduceOp.MAX, group=group)
    shifted_BSVp = z_BSVp - max_BS.unsqueeze(-1)
    exp_BSVp = shifted_BSVp.exp()
    sum_exp_BS = reduce_from_tensor_model_parallel_region(exp_BSVp.sum(dim=-1), group=group)
    sum_exp_z_BS = reduce_from_tensor_model_parallel_region((exp_BSVp * shifted_BSVp).sum(dim=-1), group=group)
    return sum_exp_BS.log() - sum_exp_z_BS / sum_exp_BS


def response_logprobs_and_entropy(
    logits_BSVp: torch.Tensor, batch: PaddedBatch, temperature: float = 1.0, with_entropy: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-sample response log-probs [R] (and entropies [R]) of one forward's logits."""
    logprobs = split_responses(token_logprobs(logits_BSVp, batch.targets_BS, temperature), batch)
    if not with_entropy:
        return logprobs, None
    return logprobs, split_responses(token_entropy(logits_BSVp, temperature), batch)
