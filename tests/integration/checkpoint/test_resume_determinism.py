"""Stop after a checkpoint and resume: the run continues exactly as if it had not stopped.

Two runs of the quickstart loop with the same seed (tiny model, a short SFT warm-up, 4 RL steps):
A runs straight through; B runs 2 steps (saving), exits, and is started again to finish steps
3-4 from its checkpoint. Per-step reward and loss must agree to 1e-6 and the final weights must
have the same sha256. This is the local-executor half of the preemption issue; the Slurm
signal/requeue half builds on it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miles.engines.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parents[3]


def _run(tmp_path: Path, name: str, num_steps: int, model: Path, data: Path, sft: Path) -> None:
    overrides = [
        f"model.path={model}", f"rollout.data_path={data}", f"sft.data_path={sft}", "sft.steps=10",
        "rollout.rollout_batch_size=8", f"run.num_steps={num_steps}", f"run.output_dir={tmp_path}", f"run.name={name}",
        "checkpoint.save_interval=2", f"engine.base_port={free_port_range(2)}", f"router.port={free_port()}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "miles.driver", "--recipe", "quickstart", *overrides],
                          cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _steps(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["step"] >= 0 and "rollout/reward_mean" in r}


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted(tiny_model, tmp_path):
    data, sft = tmp_path / "data.jsonl", tmp_path / "sft.jsonl"
    for out, task, seed in ((data, "repeat", "0"), (sft, "repeat-sft", "1")):
        subprocess.run([sys.executable, "-m", "miles.rollout.synthetic", str(out), "--task", task, "--seed", seed], check=True)

    _run(tmp_path, "straight", 4, tiny_model, data, sft)
    _run(tmp_path, "resumed", 2, tiny_model, data, sft)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    _run(tmp_path, "resumed", 4, tiny_model, data, sft)

    a, b = _steps(tmp_path / "straight"), _steps(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])
    digest_a = (tmp_path / "straight" / "final_weights.sha256").read_text()
    digest_b = (tmp_path / "resumed" / "final_weights.sha256").read_text()
    assert digest_a == digest_b
