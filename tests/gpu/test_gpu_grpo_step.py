"""One GRPO step end to end on GPUs: `python -m miles.driver` with engine.kind=sglang.

The quickstart recipe (task "Repeat: W"), with: the tiny Qwen3, 1 SGLang engine on GPU 1 started
by the local executor (LocalRollout -> miles.engines.sglang), the Megatron trainer in bf16 on GPU 0,
a 10-step format-only SFT warm-up (pushed to the engine over NCCL, so the step's rollout already
runs on synced weights), 8 prompts x 4 samples, run.num_steps=1. The driver must exit 0 and log one
step with a loss, a train-infer mismatch at bf16 noise, and a weight sync of the whole model.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, free_port, is_rehearsal

pytestmark = pytest.mark.gpu(count=2)

MISMATCH_MAX = 0.15
DRIVER_TIMEOUT_S = 900


def test_one_grpo_step_with_sglang(engine_slot, dense_model, tmp_path, log_dir, record):
    engine_slot.release()  # GPU 1 is the driver's engine's now
    data, sft = tmp_path / "repeat.jsonl", tmp_path / "repeat-sft.jsonl"
    for out, task, seed in ((data, "repeat", "0"), (sft, "repeat-sft", "1")):
        subprocess.run([sys.executable, "-m", "miles.rollout.synthetic", str(out), "--task", task, "--num", "64",
                        "--seed", seed], check=True, cwd=REPO)
    kind = "embedded" if is_rehearsal() else "sglang"
    overrides = [
        f"model.path={dense_model}", f"rollout.data_path={data}", f"run.output_dir={tmp_path}", "run.name=grpo",
        "run.num_steps=1", f"sft.data_path={sft}", "sft.steps=10", "sft.batch_size=16", f"engine.kind={kind}",
        "engine.num_engines=1", "engine.dtype=bfloat16", "engine.num_threads=1", "engine.startup_timeout_s=600",
        f"engine.base_port={free_port()}", f"router.port={free_port()}", "rollout.rollout_batch_size=8",
        "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=8", "rollout.dynamic_filter=", "trainer.bf16=true",
    ]
    if kind == "sglang":
        overrides.append('engine.extra_args=["--mem-fraction-static", "0.3"]')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NCCL_CUMEM_ENABLE": "0"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a world of its own, not this pytest process's
    cmd = [sys.executable, "-m", "miles.driver", "--recipe", "quickstart", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    (log_dir / "grpo-driver.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]

    run_dir = tmp_path / "grpo"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["step"] >= 0]
    assert len(steps) == 1, steps
    step = steps[0]
    for name in sorted(run_dir.joinpath("logs").glob("*.log")):
        (log_dir / f"grpo-{name.name}").write_text(name.read_text(errors="replace"))
    keys = ("rollout/reward_mean", "train/loss", "train/grad_norm", "mismatch/mean", "mismatch/max",
            "weight_sync/seconds", "weight_sync/mb", "time/step")
    record("grpo_step", {"engine": kind, "trainer": "megatron bf16 " + ("cuda:0" if torch.cuda.is_available() else "cpu"),
                         **{k: step.get(k) for k in keys}})
    assert step["mismatch/max"] < MISMATCH_MAX
    assert step["weight_sync/mb"] > 2.0 and "train/loss" in step
