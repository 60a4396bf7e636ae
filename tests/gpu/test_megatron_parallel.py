"""Megatron TP=2 and EP=2 on two GPUs (NCCL) against one GPU, from the same HF checkpoints.

Each test starts the parallel job (2 ranks, one per GPU, env:// like torchrun) and its 1-rank
reference (on GPU 0) at the same time, as separate processes, and compares what they wrote:

- dense Qwen3 (hidden 256, std-0.2 weights so layout mistakes show): TP=2 fp32 logits, log-probs,
  entropies and HF-named gradients equal TP=1 up to GEMM reduction order, and the TP all-gathered
  export is the checkpoint bit for bit; bf16 TP=2 logits stay within bf16 rounding of bf16 TP=1.
  TP=1 fp32 logits also match transformers' fp32 forward on the CPU.
- one RL train step of MegatronActor at TP=2 vs TP=1 (tests/integration/trainer/train_step_worker.py,
  unchanged): loss terms, grad norm, old/new log-probs and the weight update agree.
- Qwen3-MoE (8 experts, top-2): EP=2 logits equal EP=1 and transformers; each rank exports its own
  4 experts and together they are the checkpoint bit for bit.

The tolerances are relative to the largest reference value: fp32 differences come only from
reduction order (~1e-6 relative), a layout or communication mistake is O(1).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO, is_rehearsal

pytestmark = pytest.mark.gpu(count=2)

WORKER = Path(__file__).with_name("megatron_parallel_worker.py")
TRAIN_STEP_WORKER = REPO / "tests" / "integration" / "trainer" / "train_step_worker.py"
RANK_TIMEOUT_S = 300.0
FP32_RTOL = 1e-4
"""fp32 parallel vs reference, relative to max |reference|: reduction order only."""
AFTER_STEP_RTOL = 1e-3
"""Log-probs after one Adam step: near-zero gradients turn reduction-order noise into weight noise
of up to a fraction of lr (~3e-4 seen at lr 1e-3 on the CPU rehearsal)."""
BF16_MAX_RTOL = 0.05
"""bf16 TP=2 vs bf16 TP=1, relative to max |fp32 logit|: a few bf16 ulps of the largest logits."""


class RankJob:
    """`world_size` env:// ranks of `script args...` (rank r on GPU r), started now, collected later."""

    def __init__(self, script: Path, args: list, out: Path, world_size: int, log_dir: Path):
        out.mkdir(parents=True)
        self.script, self.args, self.out, self.world_size = script, args, out, world_size
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        self.logs = [log_dir / f"{out.name}-rank{r}.log" for r in range(world_size)]
        self.procs = []
        for rank in range(world_size):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                   "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
                   "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": _pythonpath()}
            with open(self.logs[rank], "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        self.began = time.perf_counter()

    def results(self) -> list[dict]:
        """Wait for every rank (RANK_TIMEOUT_S); a failed rank fails the test with its log tail."""
        try:
            for proc in self.procs:
                proc.wait(timeout=max(1.0, RANK_TIMEOUT_S - (time.perf_counter() - self.began)))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for rank, (proc, log) in enumerate(zip(self.procs, self.logs)):
            assert proc.returncode == 0, (f"{self.script.name} {self.args} rank {rank} exited with {proc.returncode} "
                                          f"(timeout {RANK_TIMEOUT_S:.0f} s):\n{log.read_text()[-4000:]}")
        self.seconds = time.perf_counter() - self.began
        return [torch.load(self.out / f"rank{r}.pt", map_location="cpu") for r in range(self.world_size)]


def _pythonpath() -> str:
    """The repo first (the workers import miles and the tests' helpers), then the caller's path (/tmp/site)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def scale(tensors) -> float:
    return max(1.0, max(t.abs().max().item() for t in tensors))


def max_diff(a, b) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def mean_diff(a, b) -> float:
    return (torch.cat([(x - y).abs().flatten() for x, y in zip(a, b)])).mean().item()


def hf_logits(checkpoint: Path, ids: list[list[int]]) -> list[torch.Tensor]:
    """transformers' fp32 logits of each row, on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([row])).logits[0] for row in ids]


@pytest.fixture
def log_root(log_dir, request) -> Path:
    path = log_dir / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_tp2_dense_logits_grads_and_export_match_tp1(dense_model, tmp_path, redrawn_checkpoint, log_root, record):
    from .megatron_parallel_worker import PROMPTS, RESPONSES

    original = redrawn_checkpoint(dense_model, tmp_path / "ckpt")
    tp1_job = RankJob(WORKER, ["dense", tmp_path / "ckpt", tmp_path / "tp1"], tmp_path / "tp1", 1, log_root)
    tp2_job = RankJob(WORKER, ["dense", tmp_path / "ckpt", tmp_path / "tp2"], tmp_path / "tp2", 2, log_root)
    (tp1,), tp2 = tp1_job.results(), tp2_job.results()
    ref = hf_logits(tmp_path / "ckpt", [p + r for p, r in zip(PROMPTS, RESPONSES)])

    logit_scale = scale(tp1["logits_fp32"])
    numbers = {"device": tp1["device"], "backend": tp1["backend"], "logit_scale": logit_scale,
               "tp1_vs_hf_fp32_max": max_diff(tp1["logits_fp32"], ref),
               "tp1_bf16_vs_fp32_mean": mean_diff(tp1["logits_bf16"], tp1["logits_fp32"]),
               "seconds_tp1": round(tp1_job.seconds, 1), "seconds_tp2": round(tp2_job.seconds, 1)}
    assert [r["tp_rank"] for r in tp2] == [0, 1]
    assert scale(tp1["logprobs"]) > 1.0  # a sharp distribution: layout mistakes cannot hide
    assert numbers["tp1_vs_hf_fp32_max"] <= FP32_RTOL * logit_scale, numbers
    for rank in tp2:
        r = rank["tp_rank"]
        numbers[f"tp2_rank{r}"] = got = {
            "logits_fp32_max": max_diff(rank["logits_fp32"], tp1["logits_fp32"]),
            "logprobs_max": max_diff(rank["logprobs"], tp1["logprobs"]),
            "entropy_max": max_diff(rank["entropy"], tp1["entropy"]),
            "grads_max_rel": max((rank["grads"][k] - g).abs().max().item() / max(1.0, g.abs().max().item())
                                 for k, g in tp1["grads"].items()),
            "logits_bf16_vs_tp1_bf16_max": max_diff(rank["logits_bf16"], tp1["logits_bf16"]),
            "logits_bf16_vs_fp32_mean": mean_diff(rank["logits_bf16"], tp1["logits_fp32"]),
        }
        assert got["logits_fp32_max"] <= FP32_RTOL * logit_scale, got
        assert got["logprobs_max"] <= FP32_RTOL * scale(tp1["logprobs"]), got
        assert got["entropy_max"] <= FP32_RTOL * scale(tp1["entropy"]), got
        assert rank["grads"].keys() == tp1["grads"].keys() == original.keys()
        assert got["grads_max_rel"] <= FP32_RTOL, got
        assert rank["weights"].keys() == original.keys()
        assert all(torch.equal(rank["weights"][k], t) for k, t in original.items())  # export round trip
        assert got["logits_bf16_vs_tp1_bf16_max"] <= BF16_MAX_RTOL * logit_scale, got
        # TP=2 in bf16 is no further from fp32 than TP=1 in bf16 is (statistically, over ~8k logits).
        assert got["logits_bf16_vs_fp32_mean"] <= 2 * numbers["tp1_bf16_vs_fp32_mean"] + 1e-6, (got, numbers)
    record("megatron_tp2_dense", numbers)


def test_tp2_rl_train_step_matches_tp1(dense_model, tmp_path, redrawn_checkpoint, log_root, record):
    original = redrawn_checkpoint(dense_model, tmp_path / "ckpt")
    tp1_job = RankJob(TRAIN_STEP_WORKER, [tmp_path / "ckpt", tmp_path / "tp1", 1], tmp_path / "tp1", 1, log_root)
    tp2_job = RankJob(TRAIN_STEP_WORKER, [tmp_path / "ckpt", tmp_path / "tp2", 2], tmp_path / "tp2", 2, log_root)
    (tp1,), tp2 = tp1_job.results(), tp2_job.results()

    ref = tp1["metrics"]
    assert ref["train/num_tokens"] == 12 and ref["train/skipped_steps"] == 0 and ref["train/grad_norm"] > 0.1
    changed = max((tp1["weights"][k] - t).abs().max().item() for k, t in original.items())
    assert changed > 5e-4, changed  # the step moved the weights (lr 1e-3, Adam)
    numbers = {"tp1": {k: ref[k] for k in ("train/loss", "train/grad_norm", "train/step_seconds")},
               "seconds_tp1": round(tp1_job.seconds, 1), "seconds_tp2": round(tp2_job.seconds, 1)}
    assert [(r["tp_rank"], r["dp_rank"]) for r in tp2] == [(0, 0), (1, 0)]
    for rank in tp2:
        got = rank["metrics"]
        for key in ("train/loss", "train/pg_loss", "train/kl_loss", "train/entropy", "train/tis", "train/grad_norm"):
            assert abs(got[key] - ref[key]) <= FP32_RTOL * abs(ref[key]) + 1e-7, (key, got[key], ref[key])
        updates = [(k, rank["weights"][k] - t, tp1["weights"][k] - t) for k, t in original.items()]
        numbers[f"tp2_rank{rank['tp_rank']}"] = cmp = {
            "loss": got["train/loss"], "grad_norm": got["train/grad_norm"], "step_seconds": got["train/step_seconds"],
            "old_logprobs_max": max_diff(rank["old_logprobs"], tp1["old_logprobs"]),
            "logprobs_after_max": max_diff(rank["logprobs_after"], tp1["logprobs_after"]),
            "weights_max": max((a - b).abs().max().item() for _, a, b in updates),
            "update_rel_err": max((a - b).norm().item() / b.norm().item() for _, a, b in updates if b.norm() > 0),
        }
        assert cmp["old_logprobs_max"] <= FP32_RTOL * scale(tp1["old_logprobs"]), cmp
        assert cmp["logprobs_after_max"] <= AFTER_STEP_RTOL * scale(tp1["logprobs_after"]), cmp
        # Adam's first step is lr * g / (|g| + eps), at most lr = 1e-3 per weight: the whole update must
        # agree (Frobenius, relative), and no single weight may differ by a full step.
        assert cmp["weights_max"] < 1e-3 and cmp["update_rel_err"] < 1e-2, cmp
    record("megatron_tp2_train_step", numbers)


def test_ep2_moe_logits_and_export_match_ep1(moe_model, tmp_path, redrawn_checkpoint, log_root, record):
    original = redrawn_checkpoint(moe_model, tmp_path / "ckpt")  # std 0.2: decisive routing
    ep1_job = RankJob(WORKER, ["moe", tmp_path / "ckpt", tmp_path / "ep1"], tmp_path / "ep1", 1, log_root)
    ep2_job = RankJob(WORKER, ["moe", tmp_path / "ckpt", tmp_path / "ep2"], tmp_path / "ep2", 2, log_root)
    (ep1,), ep2 = ep1_job.results(), ep2_job.results()
    ids = sorted(ep1["logits"])
    ref = hf_logits(tmp_path / "ckpt", [list(row) for row in ids])

    one = [ep1["logits"][k] for k in ids]
    logit_scale = scale(one)
    numbers = {"device": ep1["device"], "logit_scale": logit_scale, "ep1_vs_hf_fp32_max": max_diff(one, ref),
               "seconds_ep1": round(ep1_job.seconds, 1), "seconds_ep2": round(ep2_job.seconds, 1)}
    assert numbers["ep1_vs_hf_fp32_max"] <= FP32_RTOL * logit_scale, numbers
    assert ep1["weights"].keys() == original.keys()
    assert all(torch.equal(ep1["weights"][k], t) for k, t in original.items())
    assert [r["ep_rank"] for r in ep2] == [0, 1]
    for rank in ep2:
        assert sorted(rank["logits"]) == ids
        numbers[f"ep2_rank{rank['ep_rank']}_logits_max"] = diff = max_diff([rank["logits"][k] for k in ids], one)
        assert diff <= FP32_RTOL * logit_scale, numbers
    owned = [{int(n.split(".experts.")[1].split(".")[0]) for n in r["weights"] if ".experts." in n} for r in ep2]
    assert owned == [{0, 1, 2, 3}, {4, 5, 6, 7}]  # each EP rank exports its own contiguous block
    merged = {**ep2[0]["weights"], **ep2[1]["weights"]}
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)
    numbers["exported_tensors"] = len(merged)
    numbers["rehearsal"] = is_rehearsal()
    record("megatron_ep2_moe", numbers)
