"""Shared fixtures: tiny models built offline once per session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_tiny(out: Path, *extra: str) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(out), *extra],
        check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A dense tiny Qwen3 checkpoint (fp32, vocab 512, 2 layers, hidden 64)."""
    return _build_tiny(tmp_path_factory.mktemp("models") / "qwen3-tiny")


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE checkpoint (8 experts, top-2)."""
    return _build_tiny(tmp_path_factory.mktemp("models") / "qwen3-moe-tiny", "--moe")


@pytest.fixture(scope="session")
def tiny_glm4_moe_model(tmp_path_factory) -> Path:
    """A tiny GLM-4.5-style MoE checkpoint (Glm4MoeForCausalLM): 3 layers, the first dense; 8 routed
    experts top-2 with a sigmoid router and a non-zero e_score_correction_bias, 1 shared expert,
    routed_scaling_factor 2.5, partial RoPE 0.5, q/k/v bias, no q/k norm (as GLM-4.5)."""
    return _build_tiny(tmp_path_factory.mktemp("models") / "glm4-moe-tiny", "--glm4-moe", "--layers", "3",
                       "--attention-bias")


def _run_gloo_ranks(worker: Path, args: list[str], out: Path, world_size: int,
                    timeout_s: float = 240.0) -> tuple[list[dict], list[str]]:
    """Start `worker args...` as world_size env:// ranks on a free port; return each rank's
    torch.load(out / f"rank{r}.pt") and its log. A rank that fails fails the test with its log."""
    import socket

    import torch

    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, str(worker), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{worker.name} {args} rank {rank} exited with {p.returncode}:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world_size)], logs


@pytest.fixture
def gloo_ranks():
    """`gloo_ranks(worker, args, out, world_size)`: run a worker script as real gloo ranks."""
    return _run_gloo_ranks


def _redrawn_checkpoint(src: Path, out: Path, std: float = 0.2) -> dict:
    """A copy of a tiny checkpoint with std-0.2 weights (norms 1 ± 0.2), so that layout mistakes
    show clearly in the logits (at the checkpoint's std 0.02 they are nearly flat)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    gen = torch.Generator().manual_seed(0)
    state = {name: (1 + std * torch.randn(t.shape, generator=gen)) if name.endswith("norm.weight")
             else std * torch.randn(t.shape, generator=gen)
             for name, t in sorted(load_file(str(src / "model.safetensors")).items())}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return state


@pytest.fixture(scope="session")
def redrawn_checkpoint():
    """`redrawn_checkpoint(src, out) -> state dict`: see _redrawn_checkpoint."""
    return _redrawn_checkpoint


@pytest.fixture
def assert_golden(request):
    """assert_golden(name, actual): compare with golden/<name> next to the test file;
    UPDATE_GOLDEN=1 rewrites it instead."""
    import difflib

    golden_dir = Path(request.node.path).parent / "golden"

    def check(name: str, actual: str) -> None:
        path = golden_dir / name
        if os.environ.get("UPDATE_GOLDEN") == "1":
            path.write_text(actual)
        expected = path.read_text() if path.exists() else ""
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), str(path), "current"))
        assert not diff, f"{name} changed; if intended, regenerate with UPDATE_GOLDEN=1:\n{diff}"

    return check
