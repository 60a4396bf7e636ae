"""Worker of test_logprob_entropy_triton_interpret.py: runs the Triton path in Triton's CPU interpreter.

    TRITON_INTERPRET=1 python triton_interpret_worker.py   # prints one JSON line of max |diffs|

TRITON_INTERPRET must be set before `import triton` (triton's own tl.* helpers are @jit functions
decorated at import), hence a process of its own. For each case it runs logprob_entropy_triton and
the chunked torch reference on the same inputs and upstream gradients and reports the largest
absolute difference of logprob, entropy, d hidden, d weight, and the largest reference value of
each (the scale). Exit status 3: this triton's interpreter cannot run here (message on stderr).
"""

import json
import os
import sys

import torch

from miles.kernels import logprob_entropy_triton as triton_path
from miles.kernels.logprob_entropy import logprob_entropy_reference, logprob_entropy_triton
from miles.kernels.logprob_entropy_triton import TritonTiles

SMALL = TritonTiles(block_n=16, block_v=32, block_h=16, num_warps=4, num_stages=2)
"""Small tiles, so that N = 37, V = 101, H = 40 have ragged edges in every dimension."""
CASES = {
    # TARGET_PROGRAMS 1: one vocab split, so each program walks all 4 vocab tiles (online update);
    # 1000: one tile per split, combined by torch.
    "fp32_T1_one_split": dict(dtype=torch.float32, temperature=1.0, chunk_size=20, target_programs=1),
    "fp32_T0.7_many_splits": dict(dtype=torch.float32, temperature=0.7, chunk_size=20, target_programs=1000),
    "fp32_T1.5_chunk_over_N": dict(dtype=torch.float32, temperature=1.5, chunk_size=64, target_programs=4),
    "bf16_T0.8": dict(dtype=torch.bfloat16, temperature=0.8, chunk_size=16, target_programs=4),
    "fp32_logprob_only_hidden_only": dict(dtype=torch.float32, temperature=1.0, chunk_size=16, target_programs=4,
                                          entropy_grad=False, weight_grad=False),
    # the tiles the GPU uses (TILES_FP32, TILES_16BIT): one tile covers all 37 tokens
    "fp32_default_tiles": dict(dtype=torch.float32, temperature=0.9, chunk_size=1024, target_programs=528, tiles=None),
    "bf16_default_tiles": dict(dtype=torch.bfloat16, temperature=0.9, chunk_size=1024, target_programs=528, tiles=None),
}


def make_inputs(dtype, num_tokens=37, hidden=40, vocab=101, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden_NH = torch.randn(num_tokens, hidden, generator=gen)
    weight_VH = torch.randn(vocab, hidden, generator=gen) * 0.5
    targets_N = torch.randint(0, vocab, (num_tokens,), generator=gen)
    targets_N[:4] = torch.tensor([0, vocab - 1, 31, 32])  # tile borders and the last column
    return hidden_NH.to(dtype), weight_VH.to(dtype), targets_N


def run_case(dtype, temperature, chunk_size, target_programs, entropy_grad=True, weight_grad=True,
             tiles=SMALL) -> dict:
    triton_path.TARGET_PROGRAMS = target_programs
    h, w, t = make_inputs(dtype)
    h.requires_grad_()
    w.requires_grad_(weight_grad)
    gen = torch.Generator().manual_seed(1)
    g_lp = torch.randn(t.shape[0], generator=gen)
    g_ent = torch.randn(t.shape[0], generator=gen) if entropy_grad else None
    inputs = (h, w) if weight_grad else (h,)
    results = []
    for fn in (lambda: logprob_entropy_triton(h, w, t, temperature, chunk_size, tiles=tiles),
               lambda: logprob_entropy_reference(h, w, t, temperature, chunk_size=8, vocab_chunk_size=16)):
        lp, ent = fn()
        loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0)
        results.append((lp, ent, *torch.autograd.grad(loss, inputs)))
    names = ("logprob", "entropy", "d_hidden", "d_weight")
    out = {"dtypes": [str(x.dtype) for x in results[0]]}
    for name, a, b in zip(names, *results):
        out[f"{name}_max_diff"] = (a.double() - b.double()).abs().max().item()
        out[f"{name}_scale"] = b.double().abs().max().item()
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    probe = torch.zeros(1, 16), torch.zeros(16, 16), torch.zeros(1, dtype=torch.long)
    try:
        logprob_entropy_triton(*probe, tiles=SMALL)
    except Exception as exc:  # noqa: BLE001 -- reported to the test, which skips on it
        if "0-dimensional arrays" in str(exc):  # triton 3.6's interpreter with numpy >= 2.4
            import numpy
            print(f"this triton's interpreter does not run with numpy {numpy.__version__}: {exc}", file=sys.stderr)
            return 3
        raise
    print(json.dumps({name: run_case(**case) for name, case in CASES.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
