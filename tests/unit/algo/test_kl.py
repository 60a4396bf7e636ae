"""KL estimators k1/k2/k3/low_var_kl on known values, clamps, unbiasedness, gradient."""

import math

import pytest
import torch

from miles.algo.kl import kl_estimate

F64 = torch.float64


def lp(*probs):
    return torch.log(torch.tensor([probs], dtype=F64))


def test_estimators_on_known_values():
    # pi = .5, pi_ref = .25: log pi - log pi_ref = ln 2 = .693147
    #   k1 = ln 2;  k2 = (ln 2)^2 / 2 = .240227;  k3 = r - 1 - ln r with r = pi_ref/pi = .5:
    #   .5 - 1 + ln 2 = .193147
    # pi = .25, pi_ref = .5: k1 = -ln 2; k2 = .240227; k3 = 2 - 1 - ln 2 = .306853
    # pi = pi_ref: all 0
    logp, ref = lp(0.5, 0.25, 0.3), lp(0.25, 0.5, 0.3)
    ln2 = math.log(2)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[ln2, -ln2, 0]], dtype=F64))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.2402265069591007] * 2 + [0]], dtype=F64))
    k3 = torch.tensor([[0.1931471805599453, 0.3068528194400547, 0]], dtype=F64)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), k3)
    torch.testing.assert_close(kl_estimate(logp, ref, "low_var_kl"), k3)  # clamps inactive here


def test_k1_and_k3_are_unbiased_in_expectation():
    # E_{x~p}[k] summed exactly over a 3-token vocabulary equals KL(p || q):
    # p = [.5,.3,.2], q = [.2,.3,.5]: KL = .5 ln 2.5 + .2 ln .4 = .3 ln 2.5 = .274887
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=F64), torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    for name in ("k1", "k3"):
        expectation = (p * kl_estimate(p.log(), q.log(), name)).sum().item()
        assert abs(expectation - 0.3 * math.log(2.5)) < 1e-12, name
    assert abs(0.3 * math.log(2.5) - 0.27488721956224654) < 1e-15


def test_low_var_kl_clamps_log_ratio_and_result():
    # log pi = 0, log pi_ref = 30: log r = 30 -> k3 = e^30 - 31 = 1.0686e13; low_var_kl clamps
    #   log r to 20 (e^20 - 21 = 4.85e8) then the result to 10.
    # log pi = 30, log pi_ref = 0: log r = -30 -> k3 = e^-30 - 1 + 30 = 29; low_var: log r -> -20,
    #   e^-20 + 19 = 19.000000002 -> clamped to 10.
    # NaN log-prob: low_var_kl treats the log-ratio as 0 -> 0.
    logp = torch.tensor([[0.0, 30.0, float("nan")]], dtype=F64)
    ref = torch.tensor([[30.0, 0.0, 0.0]], dtype=F64)
    k3 = kl_estimate(logp, ref, "k3")
    assert abs(k3[0, 0].item() / (math.exp(30) - 31) - 1) < 1e-12
    assert abs(k3[0, 1].item() - 29.0) < 1e-9
    torch.testing.assert_close(kl_estimate(logp, ref, "low_var_kl"), torch.tensor([[10.0, 10.0, 0.0]], dtype=F64))


def test_importance_ratio_and_dtype():
    # k1 = ln 2 weighted by 2 -> 2 ln 2; fp32/bf16 inputs give a float32 result
    out = kl_estimate(lp(0.5), lp(0.25), "k1", importance_ratio_BT=torch.tensor([[2.0]], dtype=F64))
    torch.testing.assert_close(out, torch.tensor([[2 * math.log(2)]], dtype=F64))
    assert kl_estimate(torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(1, 2), "k3").dtype == torch.float32


def test_k3_gradient_pushes_toward_reference():
    # d k3 / d log pi = 1 - pi_ref/pi; pi = .5, pi_ref = .25 -> +.5 (descent lowers log pi toward ref)
    logp = lp(0.5).requires_grad_(True)
    kl_estimate(logp, lp(0.25), "k3").sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5]], dtype=F64))


def test_unknown_estimator_lists_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        kl_estimate(lp(0.5), lp(0.5), "k5")
