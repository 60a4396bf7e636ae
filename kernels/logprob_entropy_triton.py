"""Triton log-prob + entropy from hidden states and the output layer, without [N, V] logits.

Legend: N tokens, H hidden size, V vocabulary, C a chunk of tokens (chunk_size), P vocab splits.
The math is in logprob_entropy_math.py, the kernels in logprob_entropy_triton_kernels.py.

Forward (fused, one Triton kernel): programs over (token block, vocab split) walk their vocab tiles,
tl.dot-ing hidden and weight tiles into fp32 logits in registers and keeping the online partials
(m, s, a, t); torch then combines the P splits per token ([4, P, N] floats). Nothing of size
N x V is ever written. Saved for the backward: the inputs and logsumexp_N, entropy_N.

Backward (Triton recompute + cuBLAS, chunked over tokens; not one fused kernel): for each chunk
of C tokens, a Triton kernel recomputes the [C, V] logits tile by tile and writes
d logits = g_z / T in the weight's dtype (as autograd of the naive bf16 path would), then
cuBLAS computes d hidden[chunk] = d logits @ weight and d weight += d logits^T @ hidden[chunk]
(accumulated in the weight's dtype, so in bf16 for a bf16 weight). Peak extra memory is one
[C, V] block plus d weight, instead of several [N, V] fp32 tensors.

Precision: fp32 accumulation everywhere in the kernels; fp32 inputs multiply in IEEE fp32 (no
TF32). Outputs are fp32.

Runs on CUDA; on the CPU only under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
`import triton` happens on the first call, not at import.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .logprob_entropy_math import all_reduce_partials, check_inputs, combine_partials, finish_partials

DEFAULT_CHUNK_SIZE = 1024
"""Tokens per backward block: [1024, V] of d logits is 297 MiB in bf16 at V = 151936."""
TARGET_PROGRAMS = 528
"""Forward programs to aim for (4 per SM of an H100): small N gets more vocab splits."""


@dataclass(frozen=True)
class TritonTiles:
    """Tile sizes and launch settings of both kernels (powers of two >= 16, as tl.dot needs)."""

    block_n: int
    """Tokens per tile."""
    block_v: int
    """Vocabulary rows per tile."""
    block_h: int
    """Step along the hidden size (the dot's K)."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software-pipelining stages of the K loop."""

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_h"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonTiles.{name} must be a power of two >= 16 (tl.dot), got {value}")


TILES_16BIT = TritonTiles(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
"""bf16 / fp16: the shape of Triton's matmul tutorial tiles (96 KiB of shared memory)."""
TILES_FP32 = TritonTiles(block_n=64, block_v=64, block_h=32, num_warps=4, num_stages=2)
"""fp32: smaller tiles, IEEE fp32 dots are slower and twice as wide."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    try:
        from . import logprob_entropy_triton_kernels
    except ImportError as exc:
        raise RuntimeError(f"logprob_entropy_triton needs the triton package ({exc}); install triton, or use "
                           f"logprob_entropy(), which falls back to the torch reference") from exc
    return logprob_entropy_triton_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(tiles: TritonTiles, dtype: torch.dtype) -> dict:
    return {"BLOCK_N": tiles.block_n, "BLOCK_V": tiles.block_v, "BLOCK_H": tiles.block_h,
            "DOT_FP32": dtype == torch.float32 or _interpreting(),
            "num_warps": tiles.num_warps, "num_stages": tiles.num_stages}


def _forward_partials(hidden_NH, weight_VH, targets_N, temperature, tiles):
    """[4, P, N] fp32 (m, s, a, t) of P vocab splits, from one launch of the partials kernel."""
    num_tokens, hidden_size = hidden_NH.shape
    num_vocab = weight_VH.shape[0]
    token_blocks, vocab_tiles = _cdiv(num_tokens, tiles.block_n), _cdiv(num_vocab, tiles.block_v)
    wanted_splits = max(1, min(vocab_tiles, _cdiv(TARGET_PROGRAMS, max(token_blocks, 1))))
    vocab_per_split = _cdiv(vocab_tiles, wanted_splits) * tiles.block_v
    num_splits = _cdiv(num_vocab, vocab_per_split)  # no split is empty
    partials_4PN = torch.empty(4, num_splits, num_tokens, dtype=torch.float32, device=hidden_NH.device)
    if num_tokens:
        _kernels().partials_kernel[(token_blocks, num_splits)](
            hidden_NH, weight_VH, targets_N, partials_4PN[0], partials_4PN[1], partials_4PN[2], partials_4PN[3],
            num_tokens, num_vocab, hidden_size, vocab_per_split, temperature, **_launch(tiles, hidden_NH.dtype))
    return partials_4PN


class _TritonLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, chunk_size, tiles, group):
        # targets_N are relative to this shard's first row: the kernels never match ids outside [0, V)
        partials_4PN = _forward_partials(hidden_NH, weight_VH, targets_N, temperature, tiles)
        partials = combine_partials(*partials_4PN)
        if group is not None:
            partials = all_reduce_partials(*partials, (targets_N >= 0) & (targets_N < weight_VH.shape[0]), group)
        logprob_N, entropy_N, lse_N = finish_partials(*partials)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N, entropy_N)
        ctx.temperature, ctx.chunk_size, ctx.tiles, ctx.group = temperature, chunk_size, tiles, group
        return logprob_N, entropy_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp_N, g_ent_N):
        hidden_NH, weight_VH, targets_N, lse_N, entropy_N = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        tiles, chunk = ctx.tiles, ctx.chunk_size
        num_tokens, hidden_size = hidden_NH.shape
        num_vocab = weight_VH.shape[0]
        g_lp_N, g_ent_N = g_lp_N.float().contiguous(), g_ent_N.float().contiguous()
        d_hidden_NH = torch.empty_like(hidden_NH) if need_hidden else None
        d_weight_VH = torch.zeros_like(weight_VH) if need_weight else None
        kernel = _kernels().grad_logits_kernel
        for n0 in range(0, num_tokens, chunk):
            n1 = min(n0 + chunk, num_tokens)
            d_logits_CV = torch.empty(n1 - n0, num_vocab, dtype=weight_VH.dtype, device=weight_VH.device)
            kernel[(_cdiv(n1 - n0, tiles.block_n), _cdiv(num_vocab, tiles.block_v))](
                hidden_NH[n0:n1], weight_VH, targets_N[n0:n1], lse_N[n0:n1], entropy_N[n0:n1], g_lp_N[n0:n1],
                g_ent_N[n0:n1], d_logits_CV, n1 - n0, num_vocab, hidden_size, ctx.temperature,
                **_launch(tiles, hidden_NH.dtype))
            if need_hidden:
                torch.mm(d_logits_CV, weight_VH, out=d_hidden_NH[n0:n1])
            if need_weight:
                d_weight_VH.addmm_(d_logits_CV.T, hidden_NH[n0:n1])
            del d_logits_CV
        if need_hidden and ctx.group is not None:
            dist.all_reduce(d_hidden_NH, group=ctx.group)  # every shard's part of d hidden
        return d_hidden_NH, d_weight_VH, None, None, None, None, None


def logprob_entropy_triton(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor,
                           temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                           tiles: TritonTiles | None = None, *, vocab_start: int = 0,
                           group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob_N, entropy_N) fp32 of softmax((hidden_NH @ weight_VH^T) / T) with Triton (module doc).

    hidden_NH and weight_VH must share one dtype (fp32, bf16 or fp16) and be CUDA tensors (CPU
    tensors only under TRITON_INTERPRET=1). Differentiable once with respect to both; chunk_size
    is the token chunk of the backward. `tiles` overrides the per-dtype default tile sizes.
    `vocab_start` and `group`: a vocabulary sharded over a process group, as in
    logprob_entropy_reference (d hidden in bf16 is then summed over the shards in bf16).
    """
    if group is None and vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start} needs the group the vocabulary is sharded over (group=)")
    check_inputs(hidden_NH, weight_VH, targets_N, temperature, chunk_size, sharded=group is not None)
    if hidden_NH.dtype != weight_VH.dtype or hidden_NH.dtype == torch.float64:
        raise ValueError(f"logprob_entropy_triton needs hidden and weight of one dtype among fp32, bf16, fp16; got "
                         f"{hidden_NH.dtype} and {weight_VH.dtype}: cast hidden to the weight's dtype, or use "
                         f"logprob_entropy_reference (float64, mixed dtypes)")
    if not hidden_NH.is_cuda and not _interpreting():
        raise RuntimeError(f"logprob_entropy_triton needs CUDA tensors, got {hidden_NH.device}: use logprob_entropy(), "
                           f"which falls back to the torch reference, or set TRITON_INTERPRET=1 to run the kernels "
                           f"in Triton's CPU interpreter")
    _kernels()
    tiles = tiles or (TILES_FP32 if hidden_NH.dtype == torch.float32 else TILES_16BIT)
    targets_N = targets_N - vocab_start if vocab_start else targets_N
    return _TritonLogprobEntropy.apply(hidden_NH.contiguous(), weight_VH.contiguous(), targets_N.contiguous(),
                                       float(temperature), int(chunk_size), tiles, group)
