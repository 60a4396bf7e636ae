"""Per-token log-prob and entropy from hidden states and the output layer, without full logits.

Legend: N tokens (batch x sequence, flattened), H hidden size, V vocabulary.

    logprob_N, entropy_N = logprob_entropy(hidden_NH, weight_VH, targets_N, temperature)

equals log_softmax(hidden @ weight^T / T)[target] and the entropy of softmax(hidden @ weight^T / T)
(the conventions of miles/trainer/logprobs.py), in fp32, differentiable with respect to hidden
and weight, while never holding an [N, V] tensor of logits: at a 151936-token vocabulary and
8192 tokens those are 5 GiB per fp32 copy, the peak of the naive path.

Implementations (same signature, same results within rounding):
- `logprob_entropy_reference`  chunked pure torch (CPU and GPU; float64 for gradcheck).
- `logprob_entropy_triton`     fused Triton forward, Triton-recompute + cuBLAS backward (CUDA).
- `logprob_entropy`            picks Triton for CUDA tensors when triton imports, else the reference.

All three take `vocab_start=` and `group=` for a vocabulary sharded over a process group (the
tensor-parallel output layer): per-shard partials are all-reduced, see logprob_entropy_math.py.

The math (partials, how vocab tiles and TP shards combine, the gradient) is in
logprob_entropy_math.py.
"""

import importlib.util

import torch

from .logprob_entropy_reference import DEFAULT_CHUNK_SIZE, logprob_entropy_reference
from .logprob_entropy_triton import logprob_entropy_triton

__all__ = ["logprob_entropy", "logprob_entropy_reference", "logprob_entropy_triton", "uses_triton"]


def uses_triton(hidden_NH: torch.Tensor, weight_VH: torch.Tensor) -> bool:
    """Whether `logprob_entropy` takes the Triton path for these inputs."""
    return (hidden_NH.is_cuda and hidden_NH.dtype == weight_VH.dtype and hidden_NH.dtype != torch.float64
            and importlib.util.find_spec("triton") is not None)


def logprob_entropy(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor,
                    temperature: float = 1.0,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, *, vocab_start: int = 0,
                    group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob_N, entropy_N) fp32: Triton on CUDA (when triton imports and the dtypes allow), else the reference.

    `vocab_start` and `group`: weight_VH is rows [vocab_start, vocab_start + V) of a vocabulary
    sharded over the process group `group` (tensor parallelism); results cover the full vocabulary
    and d hidden is the full gradient on every rank (logprob_entropy_reference's docstring).
    """
    if uses_triton(hidden_NH, weight_VH):
        return logprob_entropy_triton(hidden_NH, weight_VH, targets_N, temperature, chunk_size,
                                      vocab_start=vocab_start, group=group)
    return logprob_entropy_reference(hidden_NH, weight_VH, targets_N, temperature, chunk_size,
                                     vocab_start=vocab_start, group=group)
