"""Triton log-prob + entropy kernel (miles.kernels) vs full-logits torch on one CUDA GPU.

Inputs with ragged edges (N = 2085 tokens, H = 1000, V = 32007) and logits of std ~3. The truth is
the float64 full-logits computation from the same (fp32 or bf16-valued) inputs; reported per
quantity: max |Triton - truth| and, for comparison, max |naive - truth| where naive is what the
trainer does today (logits = hidden @ weight^T in the working dtype, .float(), log_softmax,
entropy). Tolerances:
- forward, fp32 and bf16 inputs: 5e-4 absolute. The kernel multiplies the input values exactly and
  accumulates in fp32 (no TF32), so only fp32 summation error remains (about 1e-5 at H = 1000);
  naive bf16 rounds the logits themselves to bf16, around 1e-2.
- backward, relative to the largest gradient: 1e-4 for fp32; 2e-2 for bf16, whose d logits,
  d hidden and d weight are rounded to bf16 as in naive bf16 autograd.
Also: Triton's peak extra memory over forward + backward is at least 2x below naive's.
"""

import math
import time

import pytest
import torch

pytestmark = pytest.mark.gpu(count=1)

NUM_TOKENS, HIDDEN, VOCAB = 2085, 1000, 32007
FWD_ATOL = 5e-4
GRAD_REL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture
def cuda_no_tf32():
    if not torch.cuda.is_available():
        pytest.skip("the Triton kernel needs CUDA; on the CPU, tests/unit/kernels runs it in Triton's interpreter")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 tolerances assume IEEE fp32 cuBLAS in the backward
    yield torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = saved
    torch.cuda.empty_cache()


def make_inputs(device, dtype, num_tokens=NUM_TOKENS, hidden=HIDDEN, vocab=VOCAB, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden_NH = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
    weight_VH = (torch.randn(vocab, hidden, generator=gen, device=device) * 3 / math.sqrt(hidden)).to(dtype)
    targets_N = torch.randint(0, vocab, (num_tokens,), generator=gen, device=device)
    targets_N[:3] = torch.tensor([0, vocab - 1, 128], device=device)
    return hidden_NH, weight_VH, targets_N


def naive(hidden_NH, weight_VH, targets_N, temperature):
    """Today's trainer path: logits in the working dtype, then fp32 (float64 stays) log_softmax and entropy."""
    logits_NV = hidden_NH @ weight_VH.T
    logp_NV = torch.log_softmax(logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32)) / temperature, dim=-1)
    return logp_NV.gather(1, targets_N[:, None]).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)


def forward_backward(fn, hidden_NH, weight_VH, targets_N, g_lp_N, g_ent_N):
    h, w = hidden_NH.detach().requires_grad_(), weight_VH.detach().requires_grad_()
    lp, ent = fn(h, w, targets_N)
    d_h, d_w = torch.autograd.grad((lp * g_lp_N + ent * g_ent_N).sum(), (h, w))
    return lp.detach(), ent.detach(), d_h, d_w


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.bfloat16, 0.7)],
                         ids=["fp32_T1.0", "bf16_T0.7"])
def test_triton_matches_full_logits(cuda_no_tf32, record, dtype, temperature):
    from miles.kernels.logprob_entropy import logprob_entropy, logprob_entropy_triton, uses_triton

    device = cuda_no_tf32
    h, w, t = make_inputs(device, dtype)
    assert uses_triton(h, w)  # the dispatcher picks the kernel for CUDA tensors
    gen = torch.Generator(device=device).manual_seed(1)
    g_lp = torch.randn(NUM_TOKENS, generator=gen, device=device)
    g_ent = torch.randn(NUM_TOKENS, generator=gen, device=device)

    truth = forward_backward(lambda a, b, c: naive(a, b, c, temperature), h.double(), w.double(), t,
                             g_lp.double(), g_ent.double())
    began = time.perf_counter()
    got = forward_backward(lambda a, b, c: logprob_entropy_triton(a, b, c, temperature), h, w, t, g_lp, g_ent)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - began  # includes Triton compilation
    base = forward_backward(lambda a, b, c: naive(a, b, c, temperature), h, w, t, g_lp, g_ent)
    dispatched = logprob_entropy(h, w, t, temperature)

    names = ("logprob", "entropy", "d_hidden", "d_weight")
    numbers = {"dtype": str(dtype), "temperature": temperature, "shape_NHV": [NUM_TOKENS, HIDDEN, VOCAB],
               "first_call_s": round(first_call_s, 2)}
    for name, x, ref, nv in zip(names, got, truth, base):
        scale = ref.abs().max().item()
        numbers[f"{name}_scale"] = scale
        numbers[f"{name}_triton_max_diff"] = (x.double() - ref).abs().max().item()
        numbers[f"{name}_naive_max_diff"] = (nv.double() - ref).abs().max().item()
    record(f"kernel_parity_{numbers['dtype'].removeprefix('torch.')}", numbers)

    assert got[0].dtype == got[1].dtype == torch.float32 and got[2].dtype == got[3].dtype == dtype
    torch.testing.assert_close(dispatched[0], got[0], atol=0, rtol=0)
    for name in ("logprob", "entropy"):
        assert numbers[f"{name}_triton_max_diff"] <= FWD_ATOL, (name, numbers)
    for name in ("d_hidden", "d_weight"):
        assert numbers[f"{name}_triton_max_diff"] <= GRAD_REL[dtype] * numbers[f"{name}_scale"], (name, numbers)


def test_triton_peak_memory_is_at_least_2x_below_naive(cuda_no_tf32, record):
    from miles.kernels.logprob_entropy import logprob_entropy_triton

    device = cuda_no_tf32
    h, w, t = make_inputs(device, torch.bfloat16, num_tokens=4096, hidden=1024, vocab=64000)
    g = torch.ones(4096, device=device)
    peaks = {}
    for name, fn in (("naive", lambda a, b, c: naive(a, b, c, 1.0)), ("triton", logprob_entropy_triton)):
        forward_backward(fn, h, w, t, g, g)  # warm-up (compilation, cuBLAS workspaces)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward_backward(fn, h, w, t, g, g)
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    record("kernel_peak_memory_mib", {"shape_NHV": [4096, 1024, 64000], "dtype": "bf16", **peaks})
    assert peaks["naive"] >= 2 * peaks["triton"], peaks
