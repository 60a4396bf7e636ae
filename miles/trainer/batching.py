"""Micro-batch planning for the trainer: which samples go together, and this DP rank's share.

A micro-batch is either a fixed number of consecutive samples (`micro_batch_size`) or, under a
token budget (`max_tokens`), a greedy packing of the longest samples first so that its padded
size (samples x longest sequence) stays within the budget.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from miles.rollout.sample import Sample
from miles.trainer.logprobs import PaddedBatch, build_padded_batch


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """One micro-batch: positions of its samples in the caller's list, and the padded tensors."""

    indices: tuple[int, ...]
    """Index of each row's sample in the list handed to the actor."""
    batch: PaddedBatch
    """Right-padded model inputs on this rank's device."""
    routing: list[torch.Tensor] | None = None
    """R3 replay targets, one [S * B, K] tensor per MoE layer (miles.routing.replay), or None."""


def plan_micro_batches(lengths: Sequence[int], micro_batch_size: int,
                       max_tokens: int | None = None) -> list[list[int]]:
    """Group sample indices into micro-batches; every index appears exactly once.

    Fixed (max_tokens None): consecutive chunks of `micro_batch_size`. Dynamic: samples taken
    longest first are packed greedily; a micro-batch is closed when adding the next sample
    would make its padded size (samples x longest sequence) exceed `max_tokens`. A sample
    longer than the budget gets a micro-batch of its own.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if max_tokens is None:
        starts = range(0, len(lengths), micro_batch_size)
        return [list(range(i, min(i + micro_batch_size, len(lengths)))) for i in starts]
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if current and max(longest, lengths[i]) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def build_micro_batches(samples: Sequence[Sample], indices: Sequence[int], *, micro_batch_size: int,
                        max_tokens: int | None, pad_id: int, device: torch.device) -> list[MicroBatch]:
    """The padded micro-batches of `samples[i] for i in indices` (plan_micro_batches over their lengths)."""
    lengths = [len(samples[i].prompt_tokens) + len(samples[i].response_tokens) for i in indices]
    out = []
    for group in plan_micro_batches(lengths, micro_batch_size, max_tokens):
        chosen = [samples[indices[j]] for j in group]
        batch = build_padded_batch([s.prompt_tokens for s in chosen], [s.response_tokens for s in chosen],
                                   pad_id=pad_id, device=device)
        out.append(MicroBatch(indices=tuple(indices[j] for j in group), batch=batch))
    return out


def dp_slice(start: int, stop: int, dp_size: int, dp_rank: int) -> list[int]:
    """Data-parallel rank `dp_rank`'s contiguous share of range(start, stop) (sizes differ by at most one)."""
    n = stop - start
    return list(range(start + dp_rank * n // dp_size, start + (dp_rank + 1) * n // dp_size))
