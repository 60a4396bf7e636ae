"""Advantage estimators against hand-computed numbers (float64)."""

import math
import multiprocessing
import os
import socket

import pytest
import torch

from miles.algo.advantages import (
    compute_advantages,
    discounted_returns,
    dr_grpo_advantages,
    group_ids_for,
    group_normalized_rewards,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
)
from miles.algo.config import AlgoConfig

F64 = torch.float64


def t(values):
    return torch.tensor(values, dtype=F64)


def test_group_ids_for_flattened_matrix():
    assert group_ids_for(2, 3).tolist() == [0, 0, 0, 1, 1, 1]


def test_grpo_group_mean_std_unbiased_with_eps():
    # Group 7 rewards [1,0,0,1]: mean 0.5, centred [.5,-.5,-.5,.5], unbiased var = 4*.25/3 = 1/3,
    #   A = +-0.5 / (sqrt(1/3) + 1e-6) = +-0.8660239...
    # Group 3 rewards [1,1,1,0]: mean .75, centred [.25,.25,.25,-.75], var = (3*.0625+.5625)/3 = .25,
    #   std .5, A = [.25,.25,.25,-.75] / (.5 + 1e-6) = [.499999, .499999, .499999, -1.499997]
    # Group 5 [1,1]: std 0 -> A = 0 / 1e-6 = 0.   Group 9 [0.3] alone -> A = 0.
    # Samples are interleaved to show the ids, not the order, define the groups.
    ids = torch.tensor([7, 3, 7, 3, 7, 3, 7, 3, 5, 5, 9])
    rewards = t([1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0.3])
    a, b = 0.5 / (math.sqrt(1 / 3) + 1e-6), 0.25 / (0.5 + 1e-6)
    expected = t([a, b, -a, b, -a, b, a, -3 * b, 0, 0, 0])
    got = group_normalized_rewards(rewards, ids, std_normalize=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert abs(a - 0.8660239037870368) < 1e-12


def test_grpo_broadcasts_to_trained_tokens_only():
    mask = t([[1, 1, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]])
    adv = grpo_advantages(t([1, 0, 0, 1]), torch.zeros(4, dtype=torch.long), mask)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(adv, t([[a, a, 0], [-a, -a, -a], [0, -a, 0], [a, 0, 0]]), rtol=0, atol=1e-12)


def test_dr_grpo_is_mean_only():
    # [1,0,0,1] - 0.5 = [.5,-.5,-.5,.5]; [3, 1] - 2 = [1, -1] (no std division)
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = dr_grpo_advantages(t([1, 0, 0, 1, 3, 1]), ids, torch.ones(6, 2, dtype=F64))
    torch.testing.assert_close(adv[:, 0], t([0.5, -0.5, -0.5, 0.5, 1, -1]))
    torch.testing.assert_close(adv[:, 1], adv[:, 0])


def test_gspo_advantages_equal_grpo():
    rewards, ids, mask = t([1, 0, 0, 1]), group_ids_for(1, 4), torch.ones(4, 3, dtype=F64)
    gspo = compute_advantages(AlgoConfig(advantage_estimator="gspo"), rewards, ids, mask)
    torch.testing.assert_close(gspo, grpo_advantages(rewards, ids, mask))


def test_discounted_returns_by_hand():
    # rewards [0,0,1], gamma .5 -> G2 = 1, G1 = 0 + .5*1 = .5, G0 = .25
    torch.testing.assert_close(discounted_returns(t([[0, 0, 1]]), 0.5), t([[0.25, 0.5, 1.0]]))
    # gamma 1 sums the tail: [1,2,3] -> [6,5,3]
    torch.testing.assert_close(discounted_returns(t([[1, 2, 3]]), 1.0), t([[6, 5, 3]]))


def test_reinforce_pp_returns_kl_shaping_and_whitening():
    # kl_coef .5, gamma 1. Row 0: mask [1,1,1], KL [.1,.2,.3], R=1
    #   token rewards [-.05, -.1, -.15 + 1] -> returns [.70, .75, .85]
    # Row 1: mask [1,1,0] (pad with KL 9 that must be ignored), KL [.5,.5], R=0 on token 1
    #   token rewards [-.25, -.25, 0] -> returns [-.5, -.25, (masked)]
    # Whiten over the 5 trained values [.70,.75,.85,-.5,-.25]: sum 1.55, mean .31,
    #   deviations [.39,.44,.54,-.81,-.56], squares sum .1521+.1936+.2916+.6561+.3136 = 1.607,
    #   unbiased var 1.607/4 = .40175 -> A = dev / sqrt(.40175 + 1e-8)
    mask = t([[1, 1, 1], [1, 1, 0]])
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    adv = reinforce_pp_advantages(t([1, 0]), mask, kl_BT=kl, kl_coef=0.5, gamma=1.0)
    std = math.sqrt(0.40175 + 1e-8)
    expected = t([[0.39, 0.44, 0.54], [-0.81, -0.56, 0.0]]) / std
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)


def test_reinforce_pp_reward_goes_on_last_trained_token_and_flows_through_masked_ones():
    # mask [1,0,1,0]: last trained token is index 2. gamma .5, no KL, R = 1
    #   returns [.25, .5, 1, 0]; trained values [.25, 1]: mean .625, dev [-.375, .375],
    #   unbiased var (2 * .140625)/1 = .28125 -> A = [-.375, 0, .375, 0] / sqrt(.28125 + 1e-8)
    adv = reinforce_pp_advantages(t([1.0]), t([[1, 0, 1, 0]]), gamma=0.5)
    std = math.sqrt(0.28125 + 1e-8)
    torch.testing.assert_close(adv, t([[-0.375, 0, 0.375, 0]]) / std, rtol=0, atol=1e-12)


def test_reinforce_pp_rejects_fully_masked_sample():
    with pytest.raises(ValueError, match="no trained token"):
        reinforce_pp_advantages(t([1.0, 0.0]), t([[1, 1], [0, 0]]))


def test_reinforce_pp_baseline_by_hand():
    # groups {0: [1, 0], 1: [1, 1]} -> centred [.5, -.5, 0, 0]; kl_coef .5
    # KL rows [.2,0], [0,0], [0,.4], [0,0] -> A rows [.4,.5], [-.5,-.5], [0,-.2], [0,0]
    # 8 values sum -.3, mean -.0375; sum of squares .16+.25+.25+.25+.04 = .95
    # biased var .95/8 - .0375^2 = .11734375; unbiased x 8/7 = .134107142857...
    ids = torch.tensor([0, 0, 1, 1])
    kl = t([[0.2, 0.0], [0.0, 0.0], [0.0, 0.4], [0.0, 0.0]])
    adv = reinforce_pp_baseline_advantages(t([1, 0, 1, 1]), ids, torch.ones(4, 2, dtype=F64), kl_BT=kl, kl_coef=0.5)
    raw = t([[0.4, 0.5], [-0.5, -0.5], [0.0, -0.2], [0.0, 0.0]])
    var = (0.95 / 8 - 0.0375**2) * 8 / 7
    torch.testing.assert_close(adv, (raw + 0.0375) / math.sqrt(var + 1e-8), rtol=0, atol=1e-12)


def test_compute_advantages_dispatch_and_errors():
    rewards, ids, mask = t([1, 0, 0, 1]), group_ids_for(1, 4), torch.ones(4, 2, dtype=F64)
    dr = compute_advantages(AlgoConfig(advantage_estimator="dr_grpo"), rewards, ids, mask)
    torch.testing.assert_close(dr[:, 0], t([0.5, -0.5, -0.5, 0.5]))
    # normalize_advantages whitens GRPO's output: 8 values +-a, mean 0, unbiased var 8a^2/7
    whitened = compute_advantages(AlgoConfig(normalize_advantages=True), rewards, ids, mask)
    torch.testing.assert_close(whitened[:, 0], t([1, -1, -1, 1]) * math.sqrt(7 / 8), rtol=0, atol=1e-6)
    cfg = AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.1)
    with pytest.raises(ValueError, match="needs kl_BT"):
        compute_advantages(cfg, rewards, ids, mask)
    with pytest.raises(ValueError, match="flatten"):
        group_normalized_rewards(rewards.reshape(2, 2), ids.reshape(2, 2), std_normalize=True)


def test_masked_whiten_rejects_empty_mask():
    with pytest.raises(ValueError, match="no tokens"):
        masked_whiten(t([[1.0, 2.0]]), t([[0, 0]]))


def _whiten_worker(rank: int, port: int, values, mask, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = masked_whiten(values[rank], mask[rank], process_group=dist.group.WORLD)
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_masked_whiten_across_two_processes_equals_whole_batch():
    # Rank 0 holds [[1,2,3]], rank 1 holds [[4,5,(pad)]]; whitening with all-reduced statistics
    # must equal whitening the concatenated batch [1,2,3,4,5]: mean 3, unbiased var 2.5.
    values = [torch.tensor([[1.0, 2.0, 3.0]], dtype=F64), torch.tensor([[4.0, 5.0, 77.0]], dtype=F64)]
    mask = [torch.tensor([[1, 1, 1]]), torch.tensor([[1, 1, 0]])]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_whiten_worker, args=(r, port, values, mask, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    std = math.sqrt(2.5 + 1e-8)
    torch.testing.assert_close(results[0], t([[-2, -1, 0]]) / std)
    torch.testing.assert_close(results[1], t([[1, 2, 0]]) / std)
