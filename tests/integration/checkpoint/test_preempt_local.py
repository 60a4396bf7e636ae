"""Local executor: SIGUSR1 to the driver mid-step -> the step finishes, a checkpoint is saved, exit 75;
the same command again continues exactly like an uninterrupted run (reward/loss 1e-6, same final
weights sha256) and every sample id is trained exactly once (trained_samples.jsonl)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miles.engines.ports import free_port, free_port_range

REPO = Path(__file__).resolve().parents[3]
NUM_STEPS = 3


def _command(tmp_path: Path, name: str, model: Path, data: Path) -> list[str]:
    overrides = [f"model.path={model}", f"rollout.data_path={data}", "sft.steps=0", "rollout.rollout_batch_size=4",
                 f"run.num_steps={NUM_STEPS}", f"run.output_dir={tmp_path}", f"run.name={name}",
                 f"engine.base_port={free_port_range(2)}", f"router.port={free_port()}"]
    return [sys.executable, "-m", "miles.driver", "--recipe", "quickstart", *overrides]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE") and not k.startswith("MILES_")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _steps(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["step"] >= 0 and "train/loss" in r}  # a later row supersedes


def trained_ids(run_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in (run_dir / "trained_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(NUM_STEPS)), rows
    return [i for r in rows for i in r["samples"]]


@pytest.mark.slow
def test_sigusr1_saves_and_the_rerun_matches_an_uninterrupted_run(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    subprocess.run([sys.executable, "-m", "miles.rollout.synthetic", str(data), "--task", "repeat", "--seed", "0"],
                   check=True)
    straight = subprocess.run(_command(tmp_path, "straight", tiny_model, data), cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    cmd = _command(tmp_path, "preempted", tiny_model, data)
    run = tmp_path / "preempted"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(MILES_TEST_PAUSE_AT="train:1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "test-pause" / "train-1").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "stop requested (SIGUSR1)" in err and "stopped on request (SIGUSR1) after RL step 2" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # step 1 finished first
    assert not (run / "final_weights.sha256").exists()

    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint" in again.stderr

    a, b = _steps(tmp_path / "straight"), _steps(run)
    assert sorted(a) == sorted(b) == list(range(NUM_STEPS))
    for step in a:
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])
    assert (run / "final_weights.sha256").read_text() == (tmp_path / "straight" / "final_weights.sha256").read_text()
    ids = trained_ids(run)
    assert len(ids) == len(set(ids)) and ids == trained_ids(tmp_path / "straight")  # none twice, none skipped
