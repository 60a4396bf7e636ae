"""Chunked pure-torch log-prob + entropy from hidden states and the output layer (runs anywhere).

Legend: N tokens, H hidden size, V vocabulary, C a chunk of tokens (chunk_size), Vc a chunk of
the vocabulary (vocab_chunk_size). The math is in logprob_entropy_math.py.

Memory: the forward walks vocab chunks (outer) and token chunks (inner), so the largest
temporaries are one [C, Vc] block of logits and one [Vc, H] upcast slice of the weight; per
token it keeps only the running partials (m, s, a, t). It saves for the backward the inputs and
two [N] vectors (logsumexp, entropy), never logits. The backward recomputes each [C, Vc] block
of logits, forms g_z there, and accumulates d hidden in an [N, H] buffer and d weight one [Vc, H]
slice at a time. Peak extra memory is O(C x Vc + Vc x H + N x H) instead of O(N x V).

Accumulation is fp32 (float64 when the inputs are float64, which gradcheck uses); results are
fp32 (float64 for float64 inputs). This is both the CPU implementation and the oracle the
Triton kernel is tested against.
"""

import torch
import torch.distributed as dist

from .logprob_entropy_math import (all_reduce_partials, check_inputs, combine_partials, finish_partials,
                                   grad_scaled_logits, partials_of_logits)

DEFAULT_CHUNK_SIZE = 1024
"""Tokens per block of logits: [1024, Vc] fp32 is 64 MiB at Vc = 16384."""
DEFAULT_VOCAB_CHUNK_SIZE = 16384
"""Vocabulary rows per block: bounds the fp32 copy of a bf16 weight slice (256 MiB at H = 4096)."""


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ChunkedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, chunk_size, vocab_chunk_size, group):
        # targets_N are relative to this shard's first row: ids outside [0, V) belong to other shards
        acc = _acc_dtype(hidden_NH)
        num_tokens, num_vocab = hidden_NH.shape[0], weight_VH.shape[0]
        parts = []  # one (m_N, s_N, a_N, t_N) per vocab chunk
        for v0 in range(0, num_vocab, vocab_chunk_size):
            w_VcH = weight_VH[v0:v0 + vocab_chunk_size].to(acc)
            part = [torch.empty(num_tokens, dtype=acc, device=hidden_NH.device) for _ in range(4)]
            for n0 in range(0, num_tokens, chunk_size):
                n1 = min(n0 + chunk_size, num_tokens)
                z_CVc = (hidden_NH[n0:n1].to(acc) @ w_VcH.T) / temperature
                for dst_N, src_C in zip(part, partials_of_logits(z_CVc, targets_N[n0:n1], v0)):
                    dst_N[n0:n1] = src_C
            parts.append(part)
        m_PN, s_PN, a_PN, t_PN = (torch.stack(column) for column in zip(*parts))
        partials = combine_partials(m_PN, s_PN, a_PN, t_PN)
        if group is not None:
            partials = all_reduce_partials(*partials, (targets_N >= 0) & (targets_N < num_vocab), group)
        logprob_N, entropy_N, lse_N = finish_partials(*partials)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N, entropy_N)
        ctx.temperature, ctx.chunk_size, ctx.vocab_chunk_size = temperature, chunk_size, vocab_chunk_size
        ctx.group = group
        return logprob_N, entropy_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp_N, g_ent_N):
        hidden_NH, weight_VH, targets_N, lse_N, entropy_N = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        acc, temperature = _acc_dtype(hidden_NH), ctx.temperature
        chunk, vchunk = ctx.chunk_size, ctx.vocab_chunk_size
        num_tokens, num_vocab = hidden_NH.shape[0], weight_VH.shape[0]
        g_lp_N, g_ent_N = g_lp_N.to(acc), g_ent_N.to(acc)
        d_hidden_NH = torch.zeros(hidden_NH.shape, dtype=acc, device=hidden_NH.device) if need_hidden else None
        d_weight_VH = torch.empty_like(weight_VH) if need_weight else None
        for v0 in range(0, num_vocab, vchunk):
            w_VcH = weight_VH[v0:v0 + vchunk].to(acc)
            d_w_VcH = torch.zeros(w_VcH.shape, dtype=acc, device=w_VcH.device) if need_weight else None
            for n0 in range(0, num_tokens, chunk):
                n1 = min(n0 + chunk, num_tokens)
                h_CH = hidden_NH[n0:n1].to(acc)
                z_CVc = (h_CH @ w_VcH.T) / temperature
                d_logits_CVc = grad_scaled_logits(z_CVc, targets_N[n0:n1], v0, lse_N[n0:n1], entropy_N[n0:n1],
                                                  g_lp_N[n0:n1], g_ent_N[n0:n1]) / temperature
                if need_hidden:
                    d_hidden_NH[n0:n1] += d_logits_CVc @ w_VcH
                if need_weight:
                    d_w_VcH += d_logits_CVc.T @ h_CH
            if need_weight:
                d_weight_VH[v0:v0 + vchunk] = d_w_VcH
        if need_hidden and ctx.group is not None:
            dist.all_reduce(d_hidden_NH, group=ctx.group)  # every shard's part of d hidden
        d_hidden = d_hidden_NH.to(hidden_NH.dtype) if need_hidden else None
        return d_hidden, d_weight_VH, None, None, None, None, None


def logprob_entropy_reference(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor,
                              temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                              vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE, *, vocab_start: int = 0,
                              group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob_N, entropy_N) of softmax((hidden_NH @ weight_VH^T) / T), chunked (module doc).

    Differentiable with respect to hidden_NH and weight_VH (once: no double backward); the
    backward recomputes the logits chunk by chunk. Outputs are fp32 (float64 for float64 inputs).

    Vocabulary sharded over a process group (tensor parallelism): pass `group` and, on each rank,
    its shard weight_VH = rows [vocab_start, vocab_start + V) of the full output layer and the
    global target ids. Results are then over the full vocabulary, identical on every rank; d hidden
    is the full gradient (all-reduced over `group`), d weight this shard's. Collective: call it
    on every rank of `group` with the same tokens.
    """
    if group is None and vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start} needs the group the vocabulary is sharded over (group=)")
    check_inputs(hidden_NH, weight_VH, targets_N, temperature, chunk_size, sharded=group is not None)
    if vocab_chunk_size <= 0:
        raise ValueError(f"vocab_chunk_size must be a positive number of vocabulary rows, got {vocab_chunk_size}")
    return _ChunkedLogprobEntropy.apply(hidden_NH, weight_VH, targets_N - vocab_start if vocab_start else targets_N,
                                       float(temperature), int(chunk_size), int(vocab_chunk_size), group)
