"""A checkpoint saved by 2 gloo ranks at TP=2 resumes in 1 process at TP=1.

The resumed run must hold exactly the saved weights, and its next step (Adam moments and step
count, lr-warmup position) must equal the step the TP=2 run took without stopping, up to fp32
noise from the different reduction order.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("reshard_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, model: Path, root: Path, out: Path, world_size: int, tp_size: int,
              timeout_s: float = 240.0) -> tuple[list[dict], list[str]]:
    """Start world_size worker processes (env:// on a free port); their results and logs."""
    out.mkdir()
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(model), str(root), str(out),
                                       str(tp_size)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{mode} rank {rank} exited with {p.returncode}:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world_size)], logs


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_tp2_checkpoint_resumes_at_tp1_with_the_same_next_step(tiny_model, tmp_path):
    root = tmp_path / "checkpoints"
    saved, save_logs = run_ranks("save", tiny_model, root, tmp_path / "tp2", world_size=2, tp_size=2)
    (resumed,), (load_log,) = run_ranks("load", tiny_model, root, tmp_path / "tp1", world_size=1, tp_size=1)
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
