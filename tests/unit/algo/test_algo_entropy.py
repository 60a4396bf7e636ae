"""Entropy from logits: known values, temperature, stability, -inf entries, vocabulary shards."""

import math

import pytest
import torch

from miles.algo.entropy import entropy_from_logits, entropy_from_partials, entropy_partials

F64 = torch.float64


def test_known_values_and_temperature():
    # uniform over 4 -> ln 4 = 1.386294 (any temperature)
    # logits [0, ln 3] -> p = [.25, .75], H = .25 ln 4 + .75 ln(4/3) = .5623351
    # temperature 2 -> z = [0, ln 3 / 2], p = [1, sqrt 3] / (1 + sqrt 3) = [.3660254, .6339746],
    #   H = -(.3660254 ln .3660254 + .6339746 ln .6339746) = .6568064
    uniform = torch.zeros(1, 1, 4, dtype=F64)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.tensor([[math.log(4)]], dtype=F64))
    torch.testing.assert_close(entropy_from_logits(uniform, 3.0), torch.tensor([[math.log(4)]], dtype=F64))
    two = torch.tensor([[[0.0, math.log(3)]]], dtype=F64)
    assert abs(entropy_from_logits(two).item() - 0.5623351446188083) < 1e-12
    assert abs(entropy_from_logits(two, temperature=2.0).item() - 0.6568063976894717) < 1e-12
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(two, temperature=0.0)


def test_stable_for_large_logits_and_low_precision():
    big = torch.tensor([[[1000.0, 1000.0 + math.log(3)]]], dtype=torch.float32)
    out = entropy_from_logits(big)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert abs(out.item() - 0.5623351446188083) < 1e-3  # 1000 + ln 3 is stored to ~6e-5 in fp32
    bf16 = torch.full((2, 3, 8), 50.0, dtype=torch.bfloat16)
    torch.testing.assert_close(entropy_from_logits(bf16), torch.full((2, 3), math.log(8)))


def test_minus_inf_entries_are_ignored_and_gradient_finite():
    # [0, -inf, ln 3] is the same distribution as [0, ln 3]
    logits = torch.tensor([[[0.0, float("-inf"), math.log(3)]]], dtype=F64, requires_grad=True)
    out = entropy_from_logits(logits)
    assert abs(out.item() - 0.5623351446188083) < 1e-12
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 1] == 0


def test_gradient_sign():
    # p = [.25, .75]: raising the dominant logit sharpens p, so dH/dz_1 < 0 and dH/dz_0 > 0.
    # dH/dz_i = -p_i (log p_i + H): z_1 -> -.75 (ln .75 + .5623351) = -.2060
    logits = torch.tensor([[[0.0, math.log(3)]]], dtype=F64, requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    expected = -0.75 * (math.log(0.75) + 0.5623351446188083)
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([-expected, expected], dtype=F64))


def test_vocabulary_shards_combine_to_full_entropy_and_gradient():
    torch.manual_seed(0)
    full = (torch.randn(2, 5, 10, dtype=F64) * 4).requires_grad_(True)
    sharded = full.detach().clone().requires_grad_(True)
    h_full = entropy_from_logits(full, temperature=0.7)
    parts = [entropy_partials(shard, 0.7) for shard in sharded.split([3, 7], dim=-1)]
    h_sharded = entropy_from_partials(parts)
    torch.testing.assert_close(h_sharded, h_full)
    # reference: -sum p log p at temperature .7
    logp = torch.log_softmax(full.detach() / 0.7, dim=-1)
    torch.testing.assert_close(h_full, -(logp.exp() * logp).sum(-1))
    h_full.sum().backward()
    h_sharded.sum().backward()
    torch.testing.assert_close(sharded.grad, full.grad)
    # a shard that is entirely -inf contributes nothing
    masked = torch.cat([full.detach(), torch.full((2, 5, 4), float("-inf"), dtype=F64)], dim=-1)
    parts = [entropy_partials(s, 0.7) for s in masked.split([10, 4], dim=-1)]
    torch.testing.assert_close(entropy_from_partials(parts), h_full.detach())
