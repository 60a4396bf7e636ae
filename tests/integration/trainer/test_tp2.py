"""Two real gloo ranks at TP=2 vs one rank at TP=1, both loaded from the same HF checkpoint."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WORKER = Path(__file__).with_name("tp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(checkpoint: Path, out: Path, world_size: int, timeout_s: float = 240.0) -> list[dict]:
    """Start world_size worker processes (env:// on a free port) and load their results."""
    out.mkdir()
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(checkpoint), str(out), str(world_size)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world_size)]


def redrawn_checkpoint(tiny_model: Path, out: Path) -> dict[str, torch.Tensor]:
    """A copy of the tiny checkpoint with std-0.2 weights, so layout mistakes show in the logits."""
    shutil.copytree(tiny_model, out)
    gen = torch.Generator().manual_seed(0)
    state = {name: (1 + 0.2 * torch.randn(t.shape, generator=gen)) if name.endswith("norm.weight")
             else 0.2 * torch.randn(t.shape, generator=gen)
             for name, t in sorted(load_file(str(tiny_model / "model.safetensors")).items())}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return state


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_tp2_matches_tp1_and_exports_exact_hf_weights(tiny_model, tmp_path):
    original = redrawn_checkpoint(tiny_model, tmp_path / "ckpt")
    (tp1,) = run_ranks(tmp_path / "ckpt", tmp_path / "tp1", 1)
    tp2 = run_ranks(tmp_path / "ckpt", tmp_path / "tp2", 2)

    assert [r["tp_rank"] for r in tp2] == [0, 1]
    assert [t.shape for t in tp1["logprobs"]] == [(3,), (5,)]
    assert max(t.abs().max().item() for t in tp1["logprobs"]) > 1.0  # a sharp, non-uniform distribution
    for rank in tp2:
        assert max_diff(rank["logprobs"], tp1["logprobs"]) < 1e-5
        assert max_diff(rank["entropy"], tp1["entropy"]) < 1e-5
        assert rank["weights"].keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(rank["weights"][name], tensor), name
        assert rank["grads"].keys() == original.keys()
        for name, grad in tp1["grads"].items():  # vocab-parallel CE + entropy backward agree with TP=1
            assert (rank["grads"][name] - grad).abs().max().item() < 1e-5 * max(1.0, grad.abs().max().item()), name
