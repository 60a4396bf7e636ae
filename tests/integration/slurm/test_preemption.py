"""Preemption on the real dev cluster: one het job stopped at four points, compared with an uninterrupted job.

The quickstart loop (tiny model, 5 RL steps, checkpoint every 2 steps) runs twice, submitted together with
plain `sbatch sbatch/miles-het.sbatch`: "straight" runs through; "preempted" is stopped four times, each
at a phase that the test hook MILES_TEST_PAUSE_AT holds it in (miles/checkpoint/preemption.py):

  restart 0  rollout of step 0   scancel --signal=USR1 --batch  -> step 0 finishes, save 1, exit 75, requeue
  restart 1  train of step 1     scancel --signal=USR1 --batch  -> step 1 finishes, save 2 (due anyway), requeue
  restart 2  weight sync, step 2 scontrol requeue               -> killed (TERM); resumes from 2, redoes step 2
  restart 3  save after step 3   scancel --signal=USR1 --batch  -> the save completes (4), exit 75, requeue
  restart 4  runs steps 4 to the end

Per-step reward, loss and grad norm must equal the straight run's within 1e-6, the final weights must have
the same sha256, and trained_samples.jsonl must list every sample id once, in the same order.
Run: tools/slurm-dev-cluster up && MILES_REQUIRE_SLURM=1 python -m pytest tests/integration/slurm/test_preemption.py -q -s
"""

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[3]
TEMPLATE = REPO / "sbatch" / "miles-het.sbatch"
NUM_STEPS = 5
KEYS = ("rollout/reward_mean", "train/loss", "train/grad_norm")


def _sbatch(tmp_path: Path, name: str, model: Path, data: Path, pause: str = "") -> str:
    overrides = [f"model.path={model}", f"rollout.data_path={data}", "sft.steps=0", "rollout.rollout_batch_size=4",
                 f"run.num_steps={NUM_STEPS}", f"run.output_dir={tmp_path}", f"run.name={name}",
                 "checkpoint.save_interval=2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILES_")}
    env.update(MILES_RECIPE="quickstart", MILES_OVERRIDES=" ".join(overrides), MILES_PYTHON=sys.executable,
               HF_HUB_OFFLINE="1", MILES_TEST_PAUSE_AT=pause)
    proc = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/{name}.out", str(TEMPLATE)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip().split(";")[0]


def _poke_if_pending(job: str, count: list[int]) -> None:
    """Dev-cluster quirk (Slurm 22.05): only backfill starts het jobs, and it runs only after some job or
    node changed, so a requeued het job can sit past its BeginTime for minutes (measured: 125 s).
    A no-op job update counts as a change."""
    state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.split()
    if "PENDING" in state:
        count[0] += 1
        subprocess.run(["scontrol", "update", f"JobId={job}", f"Comment=poke{count[0]}"], capture_output=True)


def _wait_for(path: Path, job: str, tmp_path: Path, timeout: float = 240) -> None:
    deadline, pokes, last = time.monotonic() + timeout, [0], 0.0
    while not path.exists():
        if time.monotonic() - last > 2:
            _poke_if_pending(job, pokes)
            last = time.monotonic()
        if time.monotonic() > deadline:
            out = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.out"))
            state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            raise AssertionError(f"{path} did not appear in {timeout} s\n{state}\n{out}")
        time.sleep(0.2)


def _steps(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["step"] >= 0 and "train/loss" in r}  # a redone step's later row wins


def _trained_ids(run_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in (run_dir / "trained_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(NUM_STEPS)), rows
    return [i for r in rows for i in r["samples"]]


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _breakdown(run: Path, batch_out: str, signalled: float) -> dict[str, float]:
    """Seconds from the restart-0 signal until restart 1 trained again, from the logs' timestamps."""
    r0, r1 = (run / "logs" / "train-0.r0.log").read_text(), (run / "logs" / "train-0.r1.log").read_text()
    line = lambda log, pat: next(x for x in log.splitlines() if re.search(pat, x))  # noqa: E731
    saved = line(r0, r"saved checkpoint")
    requeued = float(re.search(r"requeue at (\S+)", batch_out).group(1))
    restarted = float(re.search(r"restart 1 \(batch started at (\S+)\)", batch_out).group(1))
    resumed = line(r1, r"resumed from checkpoint")
    first = line(r1, r"step 1:")
    save_s = float(re.search(r"in ([\d.]+) s", saved).group(1))
    return {
        "signal_to_saved_s": _stamp(saved) - signalled, "of_which_save_s": save_s,
        "saved_to_requeue_s": requeued - _stamp(saved), "requeue_to_batch_restart_s": restarted - requeued,
        "batch_restart_to_resumed_s": _stamp(resumed) - restarted,
        "load_s": float(re.search(r"load ([\d.]+) s", resumed).group(1)),
        "save_MB_per_s": float(re.search(r"([\d.]+) MB/s", saved).group(1)),
        "load_MB_per_s": float(re.search(r"([\d.]+) MB/s", resumed).group(1)),
        "resumed_to_first_step_done_s": _stamp(first) - _stamp(resumed),
        "signal_to_training_again_s": _stamp(first) - signalled,
    }


def test_preempted_at_four_points_matches_an_uninterrupted_job(slurm_cluster, tiny_model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    subprocess.run([sys.executable, "-m", "miles.rollout.synthetic", str(data), "--task", "repeat", "--num", "64",
                    "--seed", "0"], check=True, capture_output=True)
    straight = _sbatch(tmp_path, "straight", tiny_model, data)
    job = _sbatch(tmp_path, "preempted", tiny_model, data, pause="rollout:0,train:1,sync:2,save:3")
    run, pauses = tmp_path / "preempted", tmp_path / "preempted" / "test-pause"
    began = time.monotonic()
    try:
        signalled = {}
        for point, trigger in (("rollout-0", ["scancel", "--signal=USR1", "--batch", job]),
                               ("train-1", ["scancel", "--signal=USR1", "--batch", job]),
                               ("sync-2", ["scontrol", "requeue", job]),
                               ("save-3", ["scancel", "--signal=USR1", "--batch", job])):
            _wait_for(pauses / point, job, tmp_path)
            signalled[point] = time.time()
            slurm_cluster.run(*trigger)
        _wait_for(tmp_path / "straight" / "logs" / "job.r0.status", straight, tmp_path)
        _wait_for(run / "logs" / "job.r4.status", job, tmp_path)
    finally:
        subprocess.run(["scancel", straight, job], capture_output=True)
    elapsed = time.monotonic() - began
    batch = (tmp_path / "preempted.out").read_text()

    # four stops, five batch runs of the same job; the hard requeue (restart 2) wrote no status
    assert [int(r) for r in re.findall(r"job \d+ restart (\d+)", batch)] == [0, 1, 2, 3, 4]
    statuses = {p.name: p.read_text().strip() for p in (run / "logs").glob("job.r*.status")}
    assert statuses == {
        "job.r0.status": "75 trainer saved and stopped (preemption); requeueing",
        "job.r1.status": "75 trainer saved and stopped (preemption); requeueing",
        "job.r3.status": "75 trainer saved and stopped (preemption); requeueing",
        "job.r4.status": "0 training finished"}, statuses
    resumed = {r: re.search(r"resumed from \S+ at step (\d+)", (run / "logs" / f"train-0.r{r}.log").read_text())
               for r in range(1, 5)}
    assert {r: int(m.group(1)) for r, m in resumed.items()} == {1: 1, 2: 2, 3: 2, 4: 4}
    assert "[het-group 1 (train) rank 0 r3]" in (run / "logs" / "train-0.r3.log").read_text()

    a, b = _steps(tmp_path / "straight"), _steps(run)
    assert sorted(a) == sorted(b) == list(range(NUM_STEPS))
    worst = max(abs(a[s][k] - b[s][k]) for s in a for k in KEYS)
    assert worst <= 1e-6, {s: {k: (a[s][k], b[s][k]) for k in KEYS} for s in a}
    assert (run / "final_weights.sha256").read_text() == (tmp_path / "straight" / "final_weights.sha256").read_text()
    ids = _trained_ids(run)
    assert len(ids) == len(set(ids)) == NUM_STEPS * 4 * 8 and ids == _trained_ids(tmp_path / "straight")
    assert not (run / "PREEMPT").exists()

    numbers = _breakdown(run, batch, signalled["rollout-0"])
    print(f"preemption test: {elapsed:.0f} s; max |diff| {worst:.2e};", json.dumps({k: round(v, 2) for k, v in numbers.items()}))
