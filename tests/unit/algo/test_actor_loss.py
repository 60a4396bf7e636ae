"""The composed actor loss: clip + TIS + correction + entropy + KL terms against hand arithmetic."""

import math

import pytest
import torch

from miles.algo.actor_loss import ActorLossInput, actor_loss
from miles.algo.config import AlgoConfig
from miles.algo.corrections import token_mask_rejection

F64 = torch.float64


def _inputs(**extra):
    # Ratios pi/pi_old: [[1.5, 1], [1, .5 (masked)]]; A = [[1, 1], [-1, -1]]; mask [[1,1],[1,0]]
    old = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], dtype=F64)
    logp = (old + torch.log(torch.tensor([[1.5, 1.0], [1.0, 0.5]], dtype=F64))).requires_grad_(True)
    return ActorLossInput(
        logprobs_BT=logp,
        old_logprobs_BT=old,
        advantages_BT=torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=F64),
        mask_BT=torch.tensor([[1, 1], [1, 0]]),
        **extra,
    )


def test_plain_ppo_sample_mean():
    # eps .2: row 0 [max(-1.5,-1.2) = -1.2 clipped, -1]; row 1 [1] (A=-1, r=1)
    # sample_mean: ((-1.2 - 1)/2 + 1) / 2 = (-1.1 + 1)/2 = -.05
    # pg_clipfrac: ([1,0] -> .5, [0] -> 0) / 2 = .25;  ppo_kl: ((-ln 1.5 + 0)/2 + 0)/2 = -.1013663
    loss, metrics = actor_loss(AlgoConfig(), _inputs())
    assert abs(loss.item() + 0.05) < 1e-12
    assert abs(metrics["pg_clipfrac"].item() - 0.25) < 1e-12
    assert abs(metrics["ppo_kl"].item() + math.log(1.5) / 4) < 1e-12
    assert set(metrics) == {"pg_clipfrac", "ppo_kl", "pg_loss", "loss"}


def test_tis_entropy_and_kl_terms_and_gradient():
    # TIS: old - rollout = ln [[3, 1], [.5, 1]] -> weights clamp(., 0, 2) = [[2, 1], [.5, 1]]
    #   pg = [[-2.4, -1], [.5]] -> ((-3.4)/2 + .5)/2 = -.6;  tis = (1.5 + .5)/2 = 1;  tis_clipfrac = .25
    # entropy [[1, 2], [3, 99]]: (1.5 + 3)/2 = 2.25, coef .1 -> -.225
    # k1 KL with log pi - log ref = [[.1, .2], [.3, 5]]: (.15 + .3)/2 = .225, coef .5 -> +.1125
    # total -.6 - .225 + .1125 = -.7125
    base = _inputs()
    rollout = base.old_logprobs_BT - torch.log(torch.tensor([[3.0, 1.0], [0.5, 1.0]], dtype=F64))
    ref = base.logprobs_BT.detach() - torch.tensor([[0.1, 0.2], [0.3, 5.0]], dtype=F64)
    inp = _inputs(rollout_logprobs_BT=rollout, ref_logprobs_BT=ref,
                  entropy_BT=torch.tensor([[1.0, 2.0], [3.0, 99.0]], dtype=F64))
    cfg = AlgoConfig(use_tis=True, entropy_coef=0.1, use_kl_loss=True, kl_loss_coef=0.5)
    loss, m = actor_loss(cfg, inp)
    assert abs(loss.item() + 0.7125) < 1e-12
    for key, value in {"pg_loss": -0.6, "tis": 1.0, "tis_clipfrac": 0.25, "entropy_loss": 2.25,
                       "kl_loss": 0.225, "loss": -0.7125}.items():
        assert abs(m[key].item() - value) < 1e-12, key
    # |old - rollout| = [[ln 3, 0], [ln 2, 0]] -> ((ln 3)/2 + ln 2)/2
    assert abs(m["train_rollout_logprob_abs_diff"].item() - (math.log(3) / 2 + math.log(2)) / 2) < 1e-12
    loss.backward()
    # d/dlog pi (per-sample weights 1/(B*L_b) = 1/4 row 0, 1/2 row 1):
    #  [0,0] clipped pg -> 0, KL +.5/4 = .125;  [0,1] pg -r*A*w/4 = -.25, KL +.125 -> -.125
    #  [1,0] pg r*w/2 = .25, KL .5/2 = .25 -> .5;  [1,1] masked -> 0
    torch.testing.assert_close(inp.logprobs_BT.grad, torch.tensor([[0.125, -0.125], [0.5, 0.0]], dtype=F64))


def test_correction_plug_point_rejects_tokens():
    # ratios old/rollout [[3, 1], [.5, 1]], bounds [.6, 2.5] -> keep [[0, 1], [0, 1]]
    # pg [[0, -1], [0]] -> ((0 - 1)/2 + 0)/2 = -.25; reject fraction over 3 trained tokens = 2/3
    base = _inputs()
    rollout = base.old_logprobs_BT - torch.log(torch.tensor([[3.0, 1.0], [0.5, 1.0]], dtype=F64))
    cfg = AlgoConfig(correction="miles.algo.corrections:token_mask_rejection", correction_low=0.6, correction_high=2.5)
    loss, m = actor_loss(cfg, _inputs(rollout_logprobs_BT=rollout), correction=token_mask_rejection)
    assert abs(loss.item() + 0.25) < 1e-12
    assert abs(m["mis_reject_frac"].item() - 2 / 3) < 1e-12


def test_constant_reduction_keeps_fraction_metrics_as_means():
    # Dr.GRPO reduction: pg token sum (-1.2 - 1 + 1) / (2 samples x 8) = -.075; clipfrac stays .25
    loss, m = actor_loss(AlgoConfig(loss_reduction="constant", constant_normalizer=8), _inputs())
    assert abs(loss.item() + 0.075) < 1e-12
    assert abs(m["pg_clipfrac"].item() - 0.25) < 1e-12


def test_missing_inputs_are_errors():
    with pytest.raises(ValueError, match="rollout_logprobs_BT"):
        actor_loss(AlgoConfig(use_tis=True), _inputs())
    with pytest.raises(ValueError, match="entropy_BT"):
        actor_loss(AlgoConfig(entropy_coef=0.01), _inputs())
    with pytest.raises(ValueError, match="ref_logprobs_BT"):
        actor_loss(AlgoConfig(use_kl_loss=True), _inputs())
