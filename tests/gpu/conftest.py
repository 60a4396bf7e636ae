"""Fixtures of the GPU checks: real SGLang on GPU 1, the Megatron trainer on GPU 0 (this process).

Run them on the device machine in one go with `bash tools/gpu/run_gpu_checks.sh` (installs the
offline SGLang wheelhouse, sets CUDA_HOME, collects logs and numbers). Every test here carries
`@pytest.mark.gpu(count=N)` and is skipped, with the reason, where fewer than N CUDA GPUs are
visible, so `pytest tests/gpu` on a CPU machine reports skips and exits 0.

Rehearsal (MILES_GPU_REHEARSAL=1): the same tests run on the CPU with the embedded engine in the
place of SGLang and gloo in the place of NCCL, so everything but SGLang itself is debugged before
device time is spent. Checks only real SGLang can make (routed experts) skip there.

Numbers: each test calls `record(name, {...})`; they are printed and, with MILES_GPU_RESULTS set,
written to that JSON file at the end of the session (the runner copies it to its output).
"""

import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from miles.engines.config import EngineConfig
from miles.engines.process import ServerProcess, launch_embedded_engine
from miles.engines.sglang import SGLangConfig, SGLangServer, launch_sglang_engine
from miles.rollout.sample import Sample, SampleStatus

REPO = Path(__file__).resolve().parents[2]
ENGINE_GPU = 1
"""SGLang's GPU (--base-gpu-id); the trainer in this process uses GPU 0."""
ENGINE_START_S = 600.0
"""First start compiles Triton and JIT kernels (cached for the next servers)."""
SGLANG = SGLangConfig(first_gpu=ENGINE_GPU, mem_fraction_static=0.3)
"""The flags the device smoke test verified, on a third of GPU 1 (tiny models)."""
TINY_ARGS = ("--hidden", "256")
"""head_dim 64 (4 heads), the shape the device smoke test ran SGLang's Triton attention with."""


def is_rehearsal() -> bool:
    return os.environ.get("MILES_GPU_REHEARSAL") == "1"


def pytest_collection_modifyitems(config, items):
    if is_rehearsal():
        return
    have = torch.cuda.device_count()
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        need = marker.kwargs.get("count", 1)
        if have < need:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {need} CUDA GPU(s), found {have}: run tools/gpu/run_gpu_checks.sh on the GPU machine "
                       f"(or MILES_GPU_REHEARSAL=1 for a CPU rehearsal)"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- numbers ------------------------------------------------------------------------------------
_RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def record():
    """record(name, numbers): print one line, and rewrite $MILES_GPU_RESULTS (if set) with all so far,
    so that a run cut short by a time limit still leaves its numbers."""
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (rehearsal)",
            "num_gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rehearsal": is_rehearsal()}

    def add(name: str, numbers: dict) -> None:
        _RESULTS[name] = numbers
        print(f"\nRESULT {name}: {json.dumps(numbers, sort_keys=True)}", flush=True)
        out = os.environ.get("MILES_GPU_RESULTS")
        if out:
            Path(out).write_text(json.dumps({"meta": meta, "results": _RESULTS}, indent=2, sort_keys=True))

    return add


# -- models and logs -----------------------------------------------------------------------------
def _make_tiny(out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(out), *TINY_ARGS, *extra],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


@pytest.fixture(scope="session")
def dense_model(tmp_path_factory) -> Path:
    """Tiny Qwen3 (2 layers, hidden 256, vocab 512, fp32 on disk)."""
    return _make_tiny(tmp_path_factory.mktemp("models") / "qwen3-tiny")


@pytest.fixture(scope="session")
def moe_model(tmp_path_factory) -> Path:
    """Tiny Qwen3-MoE (2 layers, 8 experts, top-2)."""
    return _make_tiny(tmp_path_factory.mktemp("models") / "qwen3-moe-tiny", "--moe")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    """Server logs: $MILES_GPU_LOG_DIR (the runner packs it) or a pytest temp folder."""
    path = Path(os.environ.get("MILES_GPU_LOG_DIR") or tmp_path_factory.mktemp("gpu-logs"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- the engine on GPU 1 -----------------------------------------------------------------------------
class EngineSlot:
    """At most one engine on GPU 1 (SGLang assumes a GPU of its own). `start` reuses the running one
    when it serves the same checkpoint with untouched weights, else stops it and starts another."""

    def __init__(self, log_dir: Path, record):
        self.log_dir, self.record = log_dir, record
        self.server: ServerProcess | None = None
        self.model: Path | None = None
        self.num_starts = 0

    def start(self, model: Path) -> ServerProcess:
        if self.server is not None and self.model == model:
            return self.server
        self.release()
        port, began = free_port(), time.perf_counter()
        log = self.log_dir / f"engine-{model.name}-{port}.log"
        engine_cfg = EngineConfig(kind="sglang", dtype="bfloat16", host="127.0.0.1")
        if is_rehearsal():
            server = launch_embedded_engine(model, "127.0.0.1", port, log,
                                            extra_args=("--dtype", "bfloat16", "--num-threads", "1"))
        else:
            server = launch_sglang_engine(model, engine_cfg, SGLANG, port, gpu_id=ENGINE_GPU, seed=0, log_path=log)
        self.server, self.model = server, model
        if isinstance(server, SGLangServer):
            info = server.wait_ready(ENGINE_START_S)
            version = info.version
        else:
            server.wait_healthy(ENGINE_START_S, path="/health_generate")
            version = requests.get(server.url + "/server_info", timeout=10).json()["version"]
        self.num_starts += 1
        self.record(f"engine_start_{self.num_starts}", {"model": model.name, "seconds": round(time.perf_counter() - began, 1),
                                                        "version": version})
        return server

    def release(self) -> None:
        """Stop the engine (also: its weights were changed and must not be reused)."""
        if self.server is not None:
            self.server.stop()
        self.server, self.model = None, None


@pytest.fixture(scope="session")
def engine_slot(log_dir, record):
    slot = EngineSlot(log_dir, record)
    yield slot
    slot.release()


# -- the trainer on GPU 0 ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trainer_parallel():
    """A one-rank torch.distributed world of this process (NCCL on GPU 0, gloo on CPU) + megatron groups."""
    from miles.trainer import cpu_compat
    from miles.trainer.parallel import init_parallel, teardown_parallel

    # Before any NCCL communicator exists: SGLang runs with cuMem off, and a trainer with it on
    # fails the first weight broadcast (docs/gpu.md, shared/reference/sglang-weight-sync-facts.md).
    os.environ["NCCL_CUMEM_ENABLE"] = "0"
    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    state = init_parallel(tp_size=1, seed=1234, env=env)
    yield state
    teardown_parallel()


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- requests and comparisons --------------------------------------------------------------------------
def generate_samples(url: str, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                     seed: int = 0, timeout_s: float = 600.0) -> list[Sample]:
    """One batch /generate (ignore_eos, fixed length); Samples with the engine's logprobs."""
    body = {"input_ids": prompts, "return_logprob": True,
            "sampling_params": [{"max_new_tokens": max_new_tokens, "temperature": temperature, "ignore_eos": True,
                                 "sampling_seed": seed + i} for i in range(len(prompts))]}
    r = requests.post(url + "/generate", json=body, timeout=timeout_s)
    assert r.status_code == 200, r.text[:2000]
    samples = []
    for i, (prompt, out) in enumerate(zip(prompts, r.json(), strict=True)):
        meta = out["meta_info"]
        assert len(out["output_ids"]) == max_new_tokens, meta.get("finish_reason")
        assert [tok for _, tok, _ in meta["output_token_logprobs"]] == out["output_ids"]
        samples.append(Sample(group_id=i, index=0, prompt_tokens=list(prompt), response_tokens=out["output_ids"],
                              loss_mask=[1] * max_new_tokens,
                              rollout_logprobs=[lp for lp, _, _ in meta["output_token_logprobs"]],
                              status=SampleStatus.TRUNCATED, weight_version=str(meta.get("weight_version", ""))))
    return samples


def mismatch(samples: list[Sample], trainer_logprobs: list[torch.Tensor]) -> dict[str, float]:
    """mean / max |engine - trainer| over all response tokens, and the mean logprob (scale)."""
    diffs = torch.cat([(torch.tensor(s.rollout_logprobs, dtype=torch.float64) - lp.double().cpu()).abs()
                       for s, lp in zip(samples, trainer_logprobs, strict=True)])
    mean_lp = sum(sum(s.rollout_logprobs) for s in samples) / sum(len(s.rollout_logprobs) for s in samples)
    return {"mean_abs": diffs.mean().item(), "max_abs": diffs.max().item(), "num_tokens": diffs.numel(),
            "mean_engine_logprob": mean_lp}


def hf_logprobs(model_path: Path, samples: list[Sample], temperature: float, device: str) -> list[torch.Tensor]:
    """Teacher-forced log_softmax(logits / T)[token] of each response under HF transformers in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_tokens + s.response_tokens], device=device)
            logits = model(input_ids=ids).logits[0, len(s.prompt_tokens) - 1:-1].float()
            lp = torch.log_softmax(logits / temperature, dim=-1)
            out.append(lp.gather(1, torch.tensor(s.response_tokens, device=device)[:, None]).squeeze(1).cpu())
    del model
    free_cuda()
    return out
