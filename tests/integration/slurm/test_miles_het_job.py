"""miles-submit on the real dev cluster: the CI-sized quickstart as a het job, fail fast, bad input.

Each job runs the real pieces: embedded engines and the router in het-group 0 (node n0), the
Megatron trainer (CPU, gloo) in het-group 1 (node n1), rendezvous through the run directory.
Run: tools/slurm-dev-cluster up && MILES_REQUIRE_SLURM=1 python -m pytest tests/integration/slurm -q
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def quickstart_args(tiny_model, tmp_path_factory) -> list[str]:
    """The quickstart recipe shrunk to CI size (2 RL steps, 2 SFT steps) on a tiny model and data in tmp."""
    data_dir = tmp_path_factory.mktemp("data")
    for name, task, seed in (("prompts.jsonl", "repeat", "0"), ("sft.jsonl", "repeat-sft", "1")):
        subprocess.run([sys.executable, "-m", "miles.rollout.synthetic", str(data_dir / name), "--task", task,
                        "--num", "64", "--seed", seed], check=True, capture_output=True)
    return ["--recipe", "quickstart", f"model.path={tiny_model}", f"rollout.data_path={data_dir / 'prompts.jsonl'}",
            f"sft.data_path={data_dir / 'sft.jsonl'}", "run.num_steps=2", "sft.steps=2"]


def _submit(cwd: Path, *args: str, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILES_")}
    return subprocess.Popen([sys.executable, "-m", "miles.launchers.submit", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _first(log: str, pattern: str) -> float:
    line = next(line for line in log.splitlines() if re.search(pattern, line))
    return _stamp(line)


def test_quickstart_het_job_completes_two_rl_steps(slurm_cluster, quickstart_args, tmp_path):
    submitted = time.time()
    proc = _submit(tmp_path, *quickstart_args, "--follow")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{out[-4000:]}\n{err[-2000:]}"
    job_id = re.search(r"submitted het job (\d+)", out).group(1)
    assert f"job {job_id} ended: COMPLETED" in out and "miles-het: OK: training finished" in out

    run = tmp_path / "runs" / "quickstart"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl_steps = [s for s in steps if s["step"] >= 0 and "train/loss" in s]
    assert [s["step"] for s in rl_steps] == [0, 1] and all("weight_sync/seconds" in s for s in rl_steps)

    logs = run / "logs"  # both groups, per rank, suffixed with the restart count
    assert {"rollout-0.r0.log", "rollout-1.r0.log", "rollout-router.r0.log", "train-0.r0.log"} <= \
        {p.name for p in logs.iterdir()}
    assert "[het-group 0 (rollout) rank 1 r0]" in (logs / "rollout-1.r0.log").read_text()
    assert "registered worker" in (logs / "rollout-router.r0.log").read_text()
    train = (logs / "train-0.r0.log").read_text()
    assert "[het-group 1 (train) rank 0 r0]" in train and "step 1:" in train
    assert (logs / "job.r0.status").read_text().strip() == "0 training finished"

    import submitit  # the submitit handle of the het job: its result is the batch script's outcome

    result = submitit.SlurmJob(folder=run / "submitit", job_id=job_id).result()
    assert result.last_metrics["step"] == 1 and result.run_dir == str(run)

    batch = (run / "submitit" / f"{job_id}_0_log.out").read_text()
    start = _first(train, r"trainer rank 0 of")
    batch_start = float(re.search(r"batch started at (\S+)\)", batch).group(1))
    breakdown = {  # submit -> first RL step, as docs/slurm.md reports it
        "submit_to_batch_start_s": batch_start - submitted,
        "plan_s": int(re.search(r"plan ready after (\d+) ms", batch).group(1)) / 1000,
        "steps_started_to_trainer_start_s": start - batch_start - int(re.search(r"steps started after (\d+) ms", batch).group(1)) / 1000,
        "trainer_init_s": _first(train, r"built GPTModel") - start,
        "wait_engines_ready_s": _first(train, r"engines and router ready") - _first(train, r"built GPTModel"),
        "sft_warmup_s": _first(train, r"SFT warm-up") - _first(train, r"engines and router ready"),
        "first_rl_step_s": _first(train, r"step 0:") - _first(train, r"SFT warm-up"),
        "submit_to_first_rl_step_s": _first(train, r"step 0:") - submitted,
    }
    print("startup breakdown:", json.dumps({k: round(v, 2) for k, v in breakdown.items()}))


def test_killed_trainer_rank_ends_the_job_fast_naming_group_and_rank(slurm_cluster, quickstart_args, tmp_path):
    # 2 fake GPUs per node: 2 engines of 1 GPU on n0, 2 trainer ranks on n1 joined through env:// (mpi4py under PMI2 is tested in test_bootstrap.py)
    proc = _submit(tmp_path, *quickstart_args, "--gpus-per-node", "2", "cluster.gpus_per_engine=1",
                   "--bootstrap", "env", "--follow")
    rendezvous = tmp_path / "runs" / "quickstart" / "rendezvous" / "train-1.json"
    deadline = time.monotonic() + 120
    while not rendezvous.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "trainer rank 1 never published its address"
        time.sleep(0.2)
    record = json.loads(rendezvous.read_text())
    os.kill(record["pid"], signal.SIGKILL)  # the dev cluster's nodes are this machine
    killed = time.monotonic()
    out, err = proc.communicate(timeout=90)
    elapsed = time.monotonic() - killed
    assert proc.returncode == 1, f"{out[-3000:]}\n{err}"
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after the kill"
    assert re.search(r"miles-het: FAILED: het-group 1 \(train\) rank 1 exited with status \d+ \[srun: task 1: Killed\]",
                     out), out[-3000:]
    assert re.search(r"job \d+ ended: FAILED", out)
    print(f"trainer rank 1 killed: job ended {elapsed:.1f} s later")


def test_plain_sbatch_refuses_an_unsupported_recipe_before_starting_anything(slurm_cluster, tmp_path):
    env = {**os.environ, "MILES_RECIPE": "glm5", "MILES_PYTHON": sys.executable}
    proc = subprocess.run(["sbatch", "--wait", f"--output={tmp_path}/batch.out", str(REPO / "sbatch" / "miles-het.sbatch")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    batch = (tmp_path / "batch.out").read_text()
    assert "MLA (multi-head latent attention)" in batch and "FAILED: invalid config" in batch
    assert not (tmp_path / "runs").exists()  # no engine, router or trainer step ever started


def test_bad_slurm_input_is_caught_before_or_by_sbatch(slurm_cluster, quickstart_args, tmp_path):
    too_many = slurm_cluster.gpus_per_node + 4
    proc = _submit(tmp_path, *quickstart_args, "--gpus-per-node", str(too_many))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"cluster.gpus_per_node={too_many}, but the nodes of partition 'debug' have at most " \
           f"{slurm_cluster.gpus_per_node} GPU(s)" in err
    proc = _submit(tmp_path, *quickstart_args, "--partition", "nosuch")
    assert proc.wait(timeout=60) == 2 and "partition 'nosuch' does not exist" in proc.stderr.read()
    # sbatch's own refusal, verbatim
    proc = _submit(tmp_path, *quickstart_args, "--constraint", "nosuchfeature")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "sbatch: error: Batch job submission failed: Invalid feature specification" in err
