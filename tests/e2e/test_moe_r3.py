"""MoE GRPO with R3 end to end on CPU: `configs/qwen3-moe-tiny-r3.yaml`, 3 steps, 2 trainer ranks, EP=2.

The engine's router is deliberately perturbed (`--router-selection-noise`): it picks other experts
than the trainer's router would for a good share of tokens, as bf16 or kernel differences do at
scale. With R3 the trainer replays the engine's choices, so the train-infer log-prob mismatch stays
at the fp32 noise floor at every step, also after weight syncs (which exercise the EP all-gather of
the experts). A control run of the same recipe without R3 shows the mismatch the perturbation causes.
Each step's routing dump is written to the node-local store, read by both ranks and deleted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miles.engines.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parents[2]
NOISE = "1.0"
MISMATCH_FLOOR = 1e-4  # issue 6: "in fp32 well below 1e-4"


def _run(tmp_path: Path, name: str, model: Path, data: Path, sft: Path, r3: bool) -> list[dict]:
    overrides = [
        f"model.path={model}", f"rollout.data_path={data}", f"sft.data_path={sft}", f"run.output_dir={tmp_path}",
        f"run.name={name}",
        f"engine.base_port={free_port_range(1)}", f"router.port={free_port()}", f"r3.enabled={str(r3).lower()}",
        f"r3.dump_dir={tmp_path / name / 'r3-dumps'}", f'engine.extra_args=["--router-selection-noise", "{NOISE}"]',
    ]
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "miles.driver", "--recipe", "qwen3-moe-tiny-r3",
                                       *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-4000:]}"
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] >= 0 and "rollout/reward_mean" in r]


@pytest.mark.slow
def test_moe_grpo_with_r3_ep2(tiny_moe_model, tmp_path):
    data, sft = tmp_path / "prompts.jsonl", tmp_path / "sft.jsonl"
    for out, task, seed in ((data, "repeat", "0"), (sft, "repeat-sft", "1")):
        subprocess.run([sys.executable, "-m", "miles.rollout.synthetic", str(out), "--task", task, "--seed", seed],
                       check=True)
    with_r3 = _run(tmp_path, "r3", tiny_moe_model, data, sft, r3=True)
    assert [r["step"] for r in with_r3] == [0, 1, 2]
    assert all("train/loss" in r and "weight_sync/seconds" in r for r in with_r3)
    # Real updates happened (non-zero advantages after the format warm-up), and were synced.
    assert max(r["train/grad_norm"] for r in with_r3) > 0 and max(r["rollout/reward_mean"] for r in with_r3) > 0
    r3_mismatch = [r["mismatch/max"] for r in with_r3]
    assert max(r3_mismatch) < MISMATCH_FLOOR, r3_mismatch
    assert all(r["r3/bytes_per_token"] > 0 and r["r3/dump_bytes"] > 0 for r in with_r3)
    assert not list((tmp_path / "r3" / "r3-dumps").glob("step-*.h5")), "trained steps' dumps must be deleted"

    without = _run(tmp_path, "no-r3", tiny_moe_model, data, sft, r3=False)
    plain_mismatch = [r["mismatch/max"] for r in without]
    print(f"mismatch/max per step with R3 {r3_mismatch}, without R3 {plain_mismatch} "
          f"(engine router selection noise {NOISE})")
    assert min(plain_mismatch) > 100 * max(r3_mismatch), (plain_mismatch, r3_mismatch)


@pytest.mark.slow
def test_glm4_moe_grpo_with_r3_ep2(tiny_glm4_moe_model, tmp_path):
    """The same recipe on a GLM-4.5-style MoE (sigmoid router with expert bias, shared expert, dense
    first layer): the dumps carry all layers (dense ones zero, as SGLang sends them), the trainer
    replays the MoE layers, and the expert bias reaches the engine with every weight sync."""
    data, sft = tmp_path / "prompts.jsonl", tmp_path / "sft.jsonl"
    for out, task, seed in ((data, "repeat", "0"), (sft, "repeat-sft", "1")):
        subprocess.run([sys.executable, "-m", "miles.rollout.synthetic", str(out), "--task", task, "--seed", seed],
                       check=True)
    steps = _run(tmp_path, "glm4-r3", tiny_glm4_moe_model, data, sft, r3=True)
    assert [r["step"] for r in steps] == [0, 1, 2]
    mismatch = [r["mismatch/max"] for r in steps]
    print(f"GLM4-MoE mismatch/max per step with R3 {mismatch} (engine router selection noise {NOISE})")
    assert max(mismatch) < MISMATCH_FLOOR, mismatch
    assert not list((tmp_path / "glm4-r3" / "r3-dumps").glob("step-*.h5"))
