"""Chunked log-prob + entropy (miles.kernels) vs full logits: values, gradients, memory, errors.

Oracle: log_softmax / entropy of the full logits hidden @ weight^T / T (and miles.algo.entropy).
Memory is asserted structurally: a TorchDispatchMode records the size of every tensor that any
op produces during forward + backward; the chunked path must never produce one of N x V elements
(the naive path, under the same recorder, does).
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from miles.algo.entropy import entropy_from_logits
from miles.kernels.logprob_entropy import (logprob_entropy, logprob_entropy_reference, logprob_entropy_triton,
                                           uses_triton)
from miles.kernels.logprob_entropy_math import (combine_partials, finish_partials, grad_scaled_logits,
                                                partials_of_logits)

N, H, V = 37, 16, 53


def make_inputs(num_tokens=N, hidden=H, vocab=V, dtype=torch.float32, seed=0, scale=3.0):
    """Logits of std ~scale: peaked enough that temperature and the target matter."""
    gen = torch.Generator().manual_seed(seed)
    hidden_NH = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    weight_VH = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * scale / math.sqrt(hidden)
    targets_N = torch.randint(0, vocab, (num_tokens,), generator=gen)
    return hidden_NH.to(dtype).requires_grad_(), weight_VH.to(dtype).requires_grad_(), targets_N


def naive(hidden_NH, weight_VH, targets_N, temperature):
    logp_NV = torch.log_softmax((hidden_NH @ weight_VH.T) / temperature, dim=-1)
    return logp_NV.gather(1, targets_N[:, None]).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk_size,vocab_chunk_size", [(7, 16), (1000, 1000), (1, 53), (36, 52)])
def test_forward_matches_full_logits_fp32(temperature, chunk_size, vocab_chunk_size):
    # N = 37 is not a multiple of 7 or 36, V = 53 not of 16 or 52; 1000 is larger than both.
    h, w, t = make_inputs()
    lp, ent = logprob_entropy_reference(h, w, t, temperature, chunk_size, vocab_chunk_size)
    lp_ref, ent_ref = naive(h, w, t, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (N,)
    torch.testing.assert_close(lp, lp_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ent_ref, atol=1e-6, rtol=1e-6)
    exact_N = entropy_from_logits(h.double() @ w.double().T, temperature)  # float64, another formula
    torch.testing.assert_close(ent.double(), exact_N, atol=1e-5, rtol=1e-5)
    assert lp.max() < 0 and ent.min() > 0 and ent.max() < math.log(V)


def test_temperature_changes_the_result():
    h, w, t = make_inputs()
    lp_1, ent_1 = logprob_entropy_reference(h, w, t, 1.0)
    lp_2, ent_2 = logprob_entropy_reference(h, w, t, 2.0)
    assert (ent_2 > ent_1).all()  # a higher temperature flattens every distribution
    assert (lp_2 - lp_1).abs().max() > 0.1


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_backward_matches_full_logits_fp32(temperature):
    h, w, t = make_inputs()
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    lp, ent = logprob_entropy_reference(h, w, t, temperature, chunk_size=7, vocab_chunk_size=16)
    got = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), (h, w))
    lp_ref, ent_ref = naive(h, w, t, temperature)
    want = torch.autograd.grad((lp_ref * g_lp + ent_ref * g_ent).sum(), (h, w))
    for name, a, b in zip(("hidden", "weight"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_gradcheck_float64(temperature):
    h, w, t = make_inputs(num_tokens=7, hidden=5, vocab=11, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda hh, ww: logprob_entropy_reference(hh, ww, t, temperature, chunk_size=3, vocab_chunk_size=4),
        (h, w), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_entropy_gradient_is_minus_p_times_centered_z():
    # dH/dz_i = -p_i (z_i - sum_j p_j z_j), checked against autograd of the entropy itself.
    gen = torch.Generator().manual_seed(2)
    z_CV = (3 * torch.randn(4, 9, generator=gen, dtype=torch.float64)).requires_grad_()
    targets_C = torch.tensor([0, 8, 3, 3])
    ent_C = entropy_from_logits(z_CV)
    (autograd_CV,) = torch.autograd.grad(ent_C.sum(), z_CV)
    p_CV = z_CV.detach().softmax(-1)
    formula_CV = -p_CV * (z_CV.detach() - (p_CV * z_CV.detach()).sum(-1, keepdim=True))
    torch.testing.assert_close(formula_CV, autograd_CV, atol=1e-12, rtol=1e-10)
    lse_C = z_CV.detach().logsumexp(-1)
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    ours_CV = grad_scaled_logits(z_CV.detach(), targets_C, 0, lse_C, ent_C.detach(), zeros, ones)
    torch.testing.assert_close(ours_CV, autograd_CV, atol=1e-12, rtol=1e-10)
    # and d logprob / dz = onehot - p
    ours_lp_CV = grad_scaled_logits(z_CV.detach(), targets_C, 0, lse_C, ent_C.detach(), ones, zeros)
    torch.testing.assert_close(ours_lp_CV, torch.nn.functional.one_hot(targets_C, 9).double() - p_CV)


def test_partials_of_uneven_vocab_parts_combine_exactly():
    # The TP recipe of logprob_entropy_math: parts of any size, any order, one combine.
    gen = torch.Generator().manual_seed(3)
    z_NV = 4 * torch.randn(6, 50, generator=gen, dtype=torch.float64)
    targets_N = torch.tensor([0, 49, 17, 18, 30, 5])
    bounds = [0, 3, 18, 19, 50]
    parts = [partials_of_logits(z_NV[:, a:b], targets_N, a) for a, b in zip(bounds, bounds[1:])]
    for order in (parts, parts[::-1]):
        m, s, a, t = (torch.stack(col) for col in zip(*order))
        lp, ent, lse = finish_partials(*combine_partials(m, s, a, t))
        logp_NV = z_NV.log_softmax(-1)
        torch.testing.assert_close(lse, z_NV.logsumexp(-1), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lp, logp_NV.gather(1, targets_N[:, None]).squeeze(1), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(ent, -(logp_NV.exp() * logp_NV).sum(-1), atol=1e-12, rtol=1e-12)


def test_stable_for_large_logits():
    h, w, t = make_inputs(dtype=torch.float32, scale=400.0)  # logits in the hundreds: exp overflows naively
    lp, ent = logprob_entropy_reference(h, w, t, 1.0, chunk_size=8, vocab_chunk_size=16)
    lp_ref, ent_ref = naive(h.double(), w.double(), t, 1.0)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double(), lp_ref, atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, atol=2e-3, rtol=1e-3)


def test_bf16_inputs_accumulate_in_fp32():
    h, w, t = make_inputs(dtype=torch.bfloat16)
    lp, ent = logprob_entropy_reference(h, w, t, 0.8, chunk_size=8, vocab_chunk_size=16)
    assert lp.dtype == ent.dtype == torch.float32
    lp_ref, ent_ref = naive(h.float(), w.float(), t, 0.8)  # the same bf16 values, upcast
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    d_h, d_w = torch.autograd.grad((lp + ent).sum(), (h, w))
    assert d_h.dtype == d_w.dtype == torch.bfloat16


# -- memory: no N x V tensor, ever ----------------------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [(str(func), x.numel()) for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
        return out


def _record_forward_and_backward(fn, h, w, t) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    forward, backward = LargestTensor(), LargestTensor()
    with forward:
        lp, ent = fn(h, w, t)
    with backward:
        (lp + 0.5 * ent).sum().backward()
    return forward.sizes, backward.sizes


@pytest.mark.parametrize("chunk_size,vocab_chunk_size", [(16, 32), (7, 96)])
def test_chunked_path_never_produces_an_N_by_V_tensor(chunk_size, vocab_chunk_size):
    num_tokens, hidden, vocab = 256, 8, 96  # N x V = 24576 >> N x H = 2048 > V x H = 768
    h, w, t = make_inputs(num_tokens, hidden, vocab)
    fn = lambda *a: logprob_entropy_reference(*a, 1.0, chunk_size, vocab_chunk_size)  # noqa: E731
    for phase, sizes in zip(("forward", "backward"), _record_forward_and_backward(fn, h, w, t)):
        assert any("mm" in op for op, _ in sizes), phase  # the recorder saw this phase's matmuls
        biggest_op, biggest = max(sizes, key=lambda s: s[1])
        assert biggest <= max(chunk_size * vocab_chunk_size, num_tokens * hidden, vocab * hidden), \
            (phase, biggest_op, biggest)
        assert biggest < num_tokens * vocab
    assert h.grad.shape == (num_tokens, hidden) and w.grad.shape == (vocab, hidden)

    # control: the same recorder catches the naive path's logits
    fn = lambda *a: naive(*a, 1.0)  # noqa: E731
    for sizes in _record_forward_and_backward(fn, h.detach().requires_grad_(), w.detach().requires_grad_(), t):
        assert max(n for _, n in sizes) >= num_tokens * vocab


def test_saves_no_logits_for_backward():
    num_tokens, hidden, vocab = 64, 4, 40
    h, w, t = make_inputs(num_tokens, hidden, vocab)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lp, ent = logprob_entropy_reference(h, w, t, 1.0, chunk_size=8, vocab_chunk_size=8)
    assert sorted(saved) == sorted([num_tokens * hidden, vocab * hidden, num_tokens, num_tokens, num_tokens])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        saved.clear()
        naive(h, w, t, 1.0)
    assert max(saved) == num_tokens * vocab  # control: the naive path saves its logits


# -- contract -------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(chunk_size=0), "chunk_size must be a positive"),
    (dict(targets_N=torch.full((N,), V)), r"targets must be token ids in \[0, 53\)"),
    (dict(targets_N=torch.zeros(N, 2, dtype=torch.long)), r"targets must be \[N\]"),
    (dict(weight_VH=torch.zeros(V, H + 1)), "hidden size differs"),
    (dict(hidden_NH=torch.zeros(2, N, H)), r"hidden must be \[N, H\]"),
])
def test_contract_errors_name_the_problem(change, message):
    h, w, t = make_inputs()
    kwargs = dict(hidden_NH=h, weight_VH=w, targets_N=t, temperature=1.0, chunk_size=8) | change
    for fn in (logprob_entropy_reference, logprob_entropy):
        with pytest.raises(ValueError, match=message):
            fn(**kwargs)


def test_dispatcher_uses_the_reference_on_cpu():
    h, w, t = make_inputs()
    assert not uses_triton(h, w)
    for a, b in zip(logprob_entropy(h, w, t, 0.7), logprob_entropy_reference(h, w, t, 0.7)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_triton_path_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w, t = make_inputs()
    with pytest.raises(RuntimeError, match="needs CUDA tensors, got cpu"):
        logprob_entropy_triton(h, w, t)
    with pytest.raises(ValueError, match="one dtype among fp32, bf16, fp16"):
        logprob_entropy_triton(h, w.detach().bfloat16(), t)
