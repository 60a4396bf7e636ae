"""A checkpoint saved by 2 gloo ranks at TP=2 resumes in 1 process at TP=1.

The resumed run must hold exactly the saved weights, and its next step (Adam moments and step
count, lr-warmup position) must equal the step the TP=2 run took without stopping, up to fp32
noise from the different reduction order.
"""

from pathlib import Path

import torch

WORKER = Path(__file__).with_name("reshard_worker.py")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_tp2_checkpoint_resumes_at_tp1_with_the_same_next_step(tiny_model, tmp_path, gloo_ranks):
    root = tmp_path / "checkpoints"
    saved, save_logs = gloo_ranks(WORKER, ["save", tiny_model, root, tmp_path / "tp2", 2], tmp_path / "tp2", 2)
    (resumed,), (load_log,) = gloo_ranks(WORKER, ["load", tiny_model, root, tmp_path / "tp1", 1], tmp_path / "tp1", 1)
    ckpt = root / "step_00000001"
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert "saved checkpoint" in save_logs[0]

    reference = saved[0]  # TP ranks export identical full weights and metrics
    assert all(torch.equal(saved[1]["weights2"][k], reference["weights2"][k]) for k in reference["weights2"])
    assert resumed["step"] == 1 and resumed["rl_state"] == {"cursor": 4}
    assert resumed["num_optimizer_steps"] == reference["num_optimizer_steps"] == 2
    assert "was saved with layout {'world_size': 2, 'tp_size': 2" in load_log
    assert "every rank restores rank 0's python/numpy/torch RNG states" in load_log
    assert torch.equal(resumed["draw"], reference["draw"])

    # the TP=2 shards reassemble into exactly the weights the TP=2 run had at the save
    assert all(torch.equal(resumed["weights1"][k], reference["weights1"][k]) for k in reference["weights1"])

    got, ref = resumed["metrics"], reference["metrics"]
    assert got["train/lr"] == ref["train/lr"] == 5e-4  # warmup step 2 of 4: the scheduler resumed
    loss_rel = abs(got["train/loss"] - ref["train/loss"]) / abs(ref["train/loss"])
    grad_rel = abs(got["train/grad_norm"] - ref["train/grad_norm"]) / ref["train/grad_norm"]
    weight_diff = max_abs_diff(resumed["weights2"], reference["weights2"])
    update = max_abs_diff(reference["weights2"], reference["weights1"])
    print(f"\nstep 2: loss TP2 {ref['train/loss']:.8f} TP1-resumed {got['train/loss']:.8f} (rel {loss_rel:.1e}); "
          f"grad_norm rel diff {grad_rel:.1e}; max |dW| {weight_diff:.1e} for an update of max {update:.1e}")
    assert loss_rel < 1e-6
    assert grad_rel < 1e-5
    assert update > 1e-4  # the step moved the weights (lr 5e-4): the comparison below is not vacuous
    # Adam's update lr * m / (sqrt(v) + eps) turns fp32 reduction-order noise in near-zero gradients into
    # weight noise far below lr; lost moments (a fresh Adam) or a wrong step count move weights by ~lr.
    assert weight_diff < 1e-5
