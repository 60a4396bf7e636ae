"""Clipped policy loss: both clip sides, asymmetric clip, dual clip, GSPO ratio, gradient signs."""

import math

import pytest
import torch

from miles.algo.policy_loss import policy_loss, sequence_mean_log_ratio
from miles.algo.reduction import reduce_sample_mean

F64 = torch.float64


def _run(ratios, advs, **kwargs):
    old = torch.zeros(1, len(ratios), dtype=F64)
    logp = torch.log(torch.tensor([ratios], dtype=F64)).requires_grad_(True)
    adv = torch.tensor([advs], dtype=F64)
    out = policy_loss(logp, old, adv, torch.ones_like(adv), **kwargs)
    return logp, out


def test_clip_both_sides_asymmetric():
    # eps_clip .2, eps_clip_high .28 -> clip range [0.8, 1.28]; loss = max(-rA, -clip(r)A)
    #  r=1.5 A=+1: max(-1.5, -1.28) = -1.28  clipped
    #  r=0.5 A=+1: max(-0.5, -0.8)  = -0.5   not clipped (pessimistic term is the unclipped one)
    #  r=0.5 A=-1: max(0.5, 0.8)    = 0.8    clipped
    #  r=1.5 A=-1: max(1.5, 1.28)   = 1.5    not clipped
    #  r=1.1 A=+1: both -1.1                  not clipped (equal is not clipped)
    #  r=1.25 A=+2: max(-2.5, -2.5) = -2.5   inside the high side (a symmetric .2 clip would give -2.4)
    _, out = _run([1.5, 0.5, 0.5, 1.5, 1.1, 1.25], [1, 1, -1, -1, 1, 2], eps_clip=0.2, eps_clip_high=0.28)
    torch.testing.assert_close(out.loss_BT, torch.tensor([[-1.28, -0.5, 0.8, 1.5, -1.1, -2.5]], dtype=F64))
    assert out.clipfrac_BT.tolist() == [[1, 0, 1, 0, 0, 0]]
    _, sym = _run([1.25], [2], eps_clip=0.2)
    torch.testing.assert_close(sym.loss_BT, torch.tensor([[-2.4]], dtype=F64))
    assert sym.clipfrac_BT.tolist() == [[1.0]]


def test_ppo_kl_is_old_minus_new():
    # ppo_kl = log pi_old - log pi = -log r: r = [2, .5] -> [-ln 2, ln 2]
    _, out = _run([2.0, 0.5], [1, 1], eps_clip=0.2)
    torch.testing.assert_close(out.ppo_kl_BT, torch.tensor([[-math.log(2), math.log(2)]], dtype=F64))


def test_dual_clip_only_for_negative_advantages():
    # c = 3, clip range [.8, 1.2]
    #  r=5 A=-1: max(5, 1.2) = 5 -> min(5, -c*A = 3) = 3   (dual clip active)
    #  r=2 A=-1: max(2, 1.2) = 2 -> min(2, 3) = 2          (not active)
    #  r=5 A=+1: max(-5, -1.2) = -1.2; dual clip does not apply to A > 0 (min(-1.2, -3) would be -3)
    logp, out = _run([5.0, 2.0, 5.0], [-1, -1, 1], eps_clip=0.2, dual_clip_c=3.0)
    torch.testing.assert_close(out.loss_BT, torch.tensor([[3.0, 2.0, -1.2]], dtype=F64))
    assert out.dual_clipfrac_BT.tolist() == [[1, 0, 0]]
    out.loss_BT.sum().backward()
    # The capped token's loss is the constant -c*A (no gradient); r=2 A=-1: d(-rA)/dlogp = r = 2.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        _run([1.0], [-1], eps_clip=0.2, dual_clip_c=0.5)


def test_gradient_signs():
    # Unclipped, d(-rA)/dlogp = -rA: A>0 gives a negative gradient (descent raises log pi),
    # A<0 a positive one; a clipped token gets no gradient.
    logp, out = _run([1.0, 1.0, 1.5], [2.0, -1.0, 1.0], eps_clip=0.2)
    out.loss_BT.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, 1.0, 0.0]], dtype=F64))


def test_gspo_sequence_ratio_values_and_clip():
    # log pi - log pi_old: row 0 [.1,.2,.3] all trained -> s = .2, ratio e^.2 = 1.2214 > 1.2 -> clipped
    # row 1 [.4,-.2,99] with the last masked -> s = .1, ratio e^.1 = 1.10517
    # A = +1 for row 0: loss -1.2 on every token; A = -1 for row 1: loss 1.10517 (unclipped)
    old = torch.zeros(2, 3, dtype=F64)
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=F64)
    torch.testing.assert_close(sequence_mean_log_ratio(logp, old, mask), torch.tensor([0.2, 0.1], dtype=F64))
    out = policy_loss(logp, old, adv, mask, eps_clip=0.2, sequence_level=True)
    r1 = math.exp(0.1)
    torch.testing.assert_close(out.loss_BT[0], torch.full((3,), -1.2, dtype=F64))
    torch.testing.assert_close(out.loss_BT[1, :2], torch.full((2,), r1, dtype=F64))
    assert out.clipfrac_BT.tolist() == [[1, 1, 1], [0, 0, 0]]
    torch.testing.assert_close(out.ppo_kl_BT[:, 0], torch.tensor([-0.2, -0.1], dtype=F64))


def test_gspo_gradient_equals_sequence_level_objective():
    # GSPO objective (unclipped): J = (1/B) sum_b -exp(s_b) A_b, s_b = mean_t (log pi - log pi_old).
    # dJ/dlog pi_bt = -(1/B) exp(s_b) A_b / L_b for trained tokens; the GSPO-token form reduced by a
    # per-sample mean must give exactly that (eps wide enough that nothing clips).
    torch.manual_seed(0)
    old = torch.randn(3, 4, dtype=F64) * 0.1
    base = old + torch.randn(3, 4, dtype=F64) * 0.05
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=F64)
    a_B = torch.tensor([1.5, -0.7, 0.3], dtype=F64)
    adv = a_B[:, None].expand(3, 4)

    logp = base.clone().requires_grad_(True)
    out = policy_loss(logp, old, adv, mask, eps_clip=0.9, eps_clip_high=10.0, sequence_level=True)
    reduce_sample_mean(out.loss_BT, mask).backward()

    ref = base.clone().requires_grad_(True)
    s_B = ((ref - old) * mask).sum(1) / mask.sum(1)
    (-(s_B.exp() * a_B).mean()).backward()

    lengths = mask.sum(1, keepdim=True)
    seq_ratio = torch.exp(((base - old) * mask).sum(1, keepdim=True) / lengths)
    expected = -(1 / 3) * seq_ratio * a_B[:, None] / lengths * mask
    torch.testing.assert_close(logp.grad, ref.grad)
    torch.testing.assert_close(logp.grad, expected)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3), eps_clip=0.2)
