"""Triton kernels of the fused log-prob + entropy (imported only by logprob_entropy_triton.py, lazily).

Legend: N tokens, H hidden size, V vocabulary; BLOCK_N x BLOCK_V a tile of logits, BLOCK_H the
step along the hidden size. Hidden [N, H] and weight [V, H] are contiguous and of one dtype.

Both kernels build a tile of scaled logits z = (hidden @ weight^T) / T the conventional way:
tl.dot of [BLOCK_N, BLOCK_H] x [BLOCK_H, BLOCK_V] tiles into an fp32 accumulator, masked loads
(zeros) on the ragged edges, 64-bit offsets into the weight (V x H can pass 2^31 elements).
The math of partials and gradients is in logprob_entropy_math.py.

- `partials_kernel`: grid (token blocks, vocab splits). A program walks the vocab tiles of its
  split with the online update of (m, s, a, t) and writes one partial per token; torch combines
  the splits (combine_partials). No logits leave the chip.
- `grad_logits_kernel`: grid (token blocks, vocab tiles). A program recomputes one tile of z and
  writes d logits = g_z / T for it (in the weight's dtype), for cuBLAS to multiply.

DOT_FP32 (constexpr): upcast the tiles and multiply in IEEE fp32. The wrapper sets it for fp32
inputs (no TF32) and under TRITON_INTERPRET=1 (the CPU interpreter mis-multiplies bf16 tiles).
"""

import triton
import triton.language as tl

NEG_BIG = tl.constexpr(-1.0e30)
"""The running max before the first tile: finite, so that (m_old - m_new) * s_old is 0, not NaN
(a constexpr: jit code may read no other globals)."""


@triton.jit
def _scaled_logits_tile(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, temperature,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        DOT_FP32: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = hidden[rows] @ weight[cols]^T / T in fp32 (0 / T where masked)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h_tile = tl.load(hidden_ptr + rows64[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
        w_tile = tl.load(weight_ptr + cols64[None, :] * H + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                         other=0.0)
        if DOT_FP32:
            acc = tl.dot(h_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h_tile, w_tile, acc)
    return acc / temperature


@triton.jit
def partials_kernel(hidden_ptr, weight_ptr, targets_ptr, m_ptr, s_ptr, a_ptr, t_ptr,
                    N, V, H, vocab_per_split, temperature,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr):
    """Per token, (m, s, a, t) over vocab columns [split * vocab_per_split, +vocab_per_split) ∩ [0, V),
    stored at [split * N + token] of the four fp32 outputs."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    m_i = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    a_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _scaled_logits_tile(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, temperature,
                                BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32)
        m_new = tl.maximum(m_i, tl.max(tl.where(col_ok[None, :], z, NEG_BIG), axis=1))
        shifted = z - m_new[:, None]
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        alpha = tl.exp(m_i - m_new)
        a_i = alpha * (a_i + (m_i - m_new) * s_i) + tl.sum(e * shifted, axis=1)
        s_i = alpha * s_i + tl.sum(e, axis=1)
        is_target = (cols.to(tl.int64)[None, :] == targets[:, None]) & col_ok[None, :]
        t_i += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        m_i = m_new
    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(s_ptr + out, s_i, mask=row_ok)
    tl.store(a_ptr + out, a_i, mask=row_ok)
    tl.store(t_ptr + out, t_i, mask=row_ok)


@triton.jit
def grad_logits_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr, g_lp_ptr, g_ent_ptr, d_logits_ptr,
                       N, V, H, temperature,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr):
    """d_logits[N, V] (dtype of the output pointer) = g_z / T, recomputing z tile by tile."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _scaled_logits_tile(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, temperature,
                            BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    g = -p * (g_lp[:, None] + g_ent[:, None] * (logp + entropy[:, None]))
    is_target = cols.to(tl.int64)[None, :] == targets[:, None]
    g = tl.where(is_target, g + g_lp[:, None], g) / temperature
    out = rows.to(tl.int64)[:, None] * V + cols[None, :]
    tl.store(d_logits_ptr + out, g.to(d_logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
