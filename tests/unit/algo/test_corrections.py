"""TIS clamp and the token-level rejection correction."""

import math

import pytest
import torch

from miles.algo.corrections import CorrectionInput, importance_ratio, tis_weights, token_mask_rejection

F64 = torch.float64


def test_tis_clamp_both_bounds():
    # log pi_old - log pi_rollout = ln [3, .5, 1.5, 1] -> ratios [3, .5, 1.5, 1]
    # clamp to [0, 2] -> [2, .5, 1.5, 1] (only the first changes)
    # clamp to [.8, 2] -> [2, .8, 1.5, 1]
    old = torch.log(torch.tensor([[3.0, 0.5, 1.5, 1.0]], dtype=F64))
    rollout = torch.zeros_like(old)
    tis = tis_weights(old, rollout, low=0.0, high=2.0)
    torch.testing.assert_close(tis.weights_BT, torch.tensor([[2.0, 0.5, 1.5, 1.0]], dtype=F64))
    assert tis.clipfrac_BT.tolist() == [[1, 0, 0, 0]]
    tis = tis_weights(old, rollout, low=0.8, high=2.0)
    torch.testing.assert_close(tis.weights_BT, torch.tensor([[2.0, 0.8, 1.5, 1.0]], dtype=F64))
    assert tis.clipfrac_BT.tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ValueError, match="0 <= low < high"):
        tis_weights(old, rollout, low=2.0, high=1.0)


def test_importance_ratio_is_detached_and_clamped():
    old = torch.tensor([[100.0, 0.0]], requires_grad=True)
    ratio = importance_ratio(old, torch.zeros(1, 2))
    assert not ratio.requires_grad
    torch.testing.assert_close(ratio, torch.tensor([[math.exp(20.0), 1.0]]))  # log-ratio clamped to 20


def test_token_mask_rejection_keeps_only_in_range_tokens():
    # ratios [3, .4, 1.5, .51, 1.99, 10(masked)] with bounds [.5, 2] -> keep [0, 0, 1, 1, 1, 0]
    # reject fraction over the 5 trained tokens: 2/5; ratio mean over trained: (3+.4+1.5+.51+1.99)/5 = 1.48
    ratios = torch.tensor([[3.0, 0.4, 1.5, 0.51, 1.99, 10.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out = token_mask_rejection(
        CorrectionInput(old_logprobs_BT=ratios.log(), rollout_logprobs_BT=torch.zeros_like(ratios),
                        mask_BT=mask, low=0.5, high=2.0)
    )
    assert out.weights_BT.tolist() == [[0, 0, 1, 1, 1, 0]]
    assert abs(out.metrics["mis_reject_frac"].item() - 0.4) < 1e-12
    assert abs(out.metrics["mis_ratio_mean"].item() - 1.48) < 1e-12
