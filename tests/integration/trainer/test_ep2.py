"""Qwen3-MoE at EP=2 on 2 gloo processes: each rank holds half the experts; logits equal transformers'
and the experts each rank exports are its own block, together the whole checkpoint, bit-exact."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from miles.trainer import hf_convert

WORKER = Path(__file__).with_name("ep_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(checkpoint: Path, out: Path, world_size: int, timeout_s: float = 240.0) -> list[dict]:
    out.mkdir()
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(checkpoint), str(out)],
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


def test_ep2_logits_and_export_match_hf(tiny_moe_model, tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {n: (1 + 0.2 * torch.randn(t.shape, generator=gen)) if n.endswith("norm.weight")
             else 0.2 * torch.randn(t.shape, generator=gen)
             for n, t in sorted(hf_convert.load_hf_state_dict(tiny_moe_model).items())}  # decisive routing
    ckpt = tmp_path / "moe"
    AutoConfig.from_pretrained(tiny_moe_model).save_pretrained(ckpt)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    results = run_ranks(ckpt, tmp_path / "out", 2)

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    worst = 0.0
    for res in results:
        for ids, got in zip(res["ids"], res["logits"]):
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0]
            worst = max(worst, (got - ref).abs().max().item())
    assert worst < 1e-5, worst

    owned = [{int(n.split(".experts.")[1].split(".")[0]) for n in r["weights"] if ".experts." in n} for r in results]
    assert owned == [{0, 1, 2, 3}, {4, 5, 6, 7}]  # each EP rank exports its own contiguous block
    merged = {**results[0]["weights"], **results[1]["weights"]}
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[k], state[k]) for k in state)
