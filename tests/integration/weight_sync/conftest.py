"""Fixtures of the weight-sync tests: a perturbed copy of the tiny model and engines on 127.0.0.1.

"Perturbed" = every tensor of the tiny checkpoint plus seeded noise (same names and shapes).
The reference engine is a FRESH engine started on the perturbed checkpoint: an engine updated to
those weights must answer a seeded request exactly like it.
"""

import shutil
import socket
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from miles.engines.process import launch_embedded_engine
from miles.weight_sync.disk import save_hf_weights

ENGINE_START_S = 120
ENGINE_ARGS = ("--num-threads", "1")
"""One intra-op thread: on 2 shared cores, OpenMP teams stall each other and decode gets 10-30x slower."""
PROBE = {"input_ids": [[11, 12, 13], [200, 201, 202, 203, 204, 205, 206]], "return_logprob": True,
         "sampling_params": [{"max_new_tokens": 24, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 5},
                             {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}]}
"""A seeded sampled request and a greedy one, in batch form."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(url: str) -> list[dict]:
    r = requests.post(url + "/generate", json=PROBE, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def assert_same_generation(got: list[dict], want: list[dict], tol: float = 1e-6) -> None:
    """Same tokens, logprobs within tol (both engines run the same code on the same weights)."""
    for g, w in zip(got, want, strict=True):
        assert g["output_ids"] == w["output_ids"]
        lg = torch.tensor([x[0] for x in g["meta_info"]["output_token_logprobs"]])
        lw = torch.tensor([x[0] for x in w["meta_info"]["output_token_logprobs"]])
        assert (lg - lw).abs().max().item() <= tol


def perturb(weights: dict[str, torch.Tensor], seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std().clamp(min=1e-3) * torch.randn(v.shape, generator=gen) for k, v in weights.items()}


@pytest.fixture(scope="session")
def original_weights(tiny_model) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model / "model.safetensors"))


@pytest.fixture(scope="session")
def perturbed_weights(original_weights) -> dict[str, torch.Tensor]:
    return perturb(original_weights)


@pytest.fixture(scope="session")
def perturbed_model(tiny_model, perturbed_weights, tmp_path_factory) -> Path:
    """A full checkpoint (config, tokenizer) holding the perturbed weights, written with save_hf_weights."""
    out = tmp_path_factory.mktemp("models") / "qwen3-tiny-perturbed"
    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_hf_weights(perturbed_weights.items(), out)
    return out


@pytest.fixture(scope="session")
def engine_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-logs")


@pytest.fixture(scope="session")
def reference_generation(perturbed_model, engine_logs) -> list[dict]:
    """PROBE answered by a fresh engine started on the perturbed checkpoint (stopped right after)."""
    port = free_port()
    proc = launch_embedded_engine(perturbed_model, "127.0.0.1", port, engine_logs / f"reference-{port}.log",
                                  extra_args=ENGINE_ARGS)
    try:
        proc.wait_healthy(ENGINE_START_S)
        return probe(proc.url)
    finally:
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def start_engine(engine_logs):
    """Factory: start_engine(model_path, wait=True) -> process; all stopped at module end."""
    procs = []

    def start(model_path, *extra_args: str, wait: bool = True):
        port = free_port()
        proc = launch_embedded_engine(model_path, "127.0.0.1", port, engine_logs / f"engine-{port}.log",
                                      extra_args=(*ENGINE_ARGS, *extra_args))
        procs.append(proc)
        if wait:
            proc.wait_healthy(ENGINE_START_S)
        return proc

    yield start
    for proc in procs:
        assert proc.stop() == 0
