"""The Triton kernels of miles.kernels.logprob_entropy_triton, run on the CPU by Triton's interpreter.

TRITON_INTERPRET=1 runs @triton.jit kernels with numpy, one program at a time, so indexing, the
masks on ragged edges, the online (m, s, a, t) update, the split combine and the backward's
d logits are checked before any GPU time. The worker (triton_interpret_worker.py, a process of
its own since the flag must be set before `import triton`) compares the Triton path with the
chunked torch reference; this test asserts the differences.

Needs triton (the dev venv has none: the test skips there, and counts for nothing then). To run
it: `pip install --target DIR triton==3.6.0 'numpy<2.4'` and PYTHONPATH=DIR (triton 3.6's
interpreter fails on numpy >= 2.4; the worker detects that and the test skips saying so).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("triton_interpret_worker.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

FP32_REL = 2e-6
"""fp32: |triton - reference| <= FP32_REL * max(1, |reference|max): both accumulate in fp32, in other orders."""
BF16_GRAD_REL = 1.6e-2
"""bf16 gradients: d logits is rounded to bf16 (2^-8 relative) before the matmuls, and so are d hidden, d weight."""


@pytest.fixture(scope="module")
def diffs() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"worker exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bound(rel: float, scale: float) -> float:
    return rel * max(1.0, scale)


@pytest.mark.parametrize("case", ["fp32_T1_one_split", "fp32_T0.7_many_splits", "fp32_T1.5_chunk_over_N",
                                  "fp32_default_tiles"])
def test_fp32_forward_and_backward_match_the_reference(diffs, case):
    d = diffs[case]
    assert d["dtypes"] == ["torch.float32"] * 4
    for name in ("logprob", "entropy", "d_hidden", "d_weight"):
        assert d[f"{name}_scale"] > 0.5, (name, d)  # the values are not trivially zero
        assert d[f"{name}_max_diff"] <= _bound(FP32_REL, d[f"{name}_scale"]), (name, d)


@pytest.mark.parametrize("case", ["bf16_T0.8", "bf16_default_tiles"])
def test_bf16_matches_the_reference_within_bf16_rounding(diffs, case):
    d = diffs[case]
    assert d["dtypes"] == ["torch.float32", "torch.float32", "torch.bfloat16", "torch.bfloat16"]
    for name in ("logprob", "entropy"):  # both multiply the same bf16 values in fp32
        assert d[f"{name}_max_diff"] <= _bound(FP32_REL, d[f"{name}_scale"]), (name, d)
    for name in ("d_hidden", "d_weight"):
        assert d[f"{name}_max_diff"] <= _bound(BF16_GRAD_REL, d[f"{name}_scale"]), (name, d)


def test_only_logprob_used_and_only_hidden_needing_grad(diffs):
    d = diffs["fp32_logprob_only_hidden_only"]
    assert "d_weight_max_diff" not in d and d["dtypes"] == ["torch.float32"] * 3
    assert d["d_hidden_max_diff"] <= _bound(FP32_REL, d["d_hidden_scale"]), d
