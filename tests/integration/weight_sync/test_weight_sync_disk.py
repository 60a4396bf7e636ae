"""Weight sync through disk: save_hf_weights + /update_weights_from_disk on a live embedded engine."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from miles.engines.client import EngineError
from miles.weight_sync.disk import save_hf_weights, update_engines_from_disk

from .conftest import assert_same_generation, probe

LONG = {"input_ids": [9, 9, 9], "return_logprob": True,
        "sampling_params": {"max_new_tokens": 300, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 3}}


@pytest.fixture(scope="module")
def engine(start_engine, tiny_model):
    """One engine on the ORIGINAL tiny model; /health is watched from spawn to ready."""
    proc = start_engine(tiny_model, wait=False)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            seen.append(requests.get(proc.url + "/health", timeout=2).status_code)
        except requests.ConnectionError:
            seen.append("refused")
        if seen[-1] == 200:
            break
        time.sleep(0.01)
    proc.health_history = seen
    proc.wait_healthy(5)
    return proc


@pytest.fixture(scope="module")
def original_generation(engine):
    return probe(engine.url)


def wait_decoding(url: str) -> None:
    deadline = time.monotonic() + 30
    while requests.get(url + "/server_info", timeout=10).json()["internal_states"][0]["num_running_reqs"] == 0:
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.01)


def test_health_is_503_until_the_model_is_loaded(engine):
    assert engine.health_history[-1] == 200
    assert 503 in engine.health_history, engine.health_history  # bound before loading, answered 503 meanwhile


def test_update_from_disk_matches_a_fresh_engine_and_reverts(engine, tiny_model, perturbed_model, original_generation,
                                                            reference_generation):
    assert original_generation[0]["output_ids"] != reference_generation[0]["output_ids"]
    assert original_generation[1]["output_ids"] != reference_generation[1]["output_ids"]
    update_engines_from_disk([engine.url], str(perturbed_model), weight_version="v1")
    after = probe(engine.url)
    assert_same_generation(after, reference_generation)
    assert {o["meta_info"]["weight_version"] for o in after} == {"v1"}
    update_engines_from_disk([engine.url], str(tiny_model), weight_version="v0")
    assert_same_generation(probe(engine.url), original_generation, tol=0.0)


def test_sharded_checkpoint_loads(engine, perturbed_weights, reference_generation, original_weights, tmp_path):
    out = save_hf_weights(perturbed_weights.items(), tmp_path / "sharded", max_shard_bytes=100_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(perturbed_weights)
    update_engines_from_disk([engine.url], str(out), weight_version="sharded")
    assert_same_generation(probe(engine.url), reference_generation)
    save_hf_weights(original_weights.items(), tmp_path / "orig")
    update_engines_from_disk([engine.url], str(tmp_path / "orig"), weight_version="v0")


@pytest.mark.parametrize("bad, needle", [
    ({"model.layers.0.mlp.bogus.weight": torch.zeros(3)}, "unknown weight name 'model.layers.0.mlp.bogus.weight'"),
    ({"model.norm.weight": torch.zeros(65)}, "model.norm.weight: shape [65] does not match the model's [64]"),
])
def test_strict_update_is_refused_whole(engine, original_weights, original_generation, tmp_path, bad, needle):
    # A valid perturbed tensor first: a refused update must not apply it either.
    tensors = {"model.layers.0.self_attn.q_proj.weight": original_weights["model.layers.0.self_attn.q_proj.weight"] * 3, **bad}
    out = save_hf_weights(tensors.items(), tmp_path / "bad")
    with pytest.raises(EngineError) as err:
        update_engines_from_disk([engine.url], str(out), weight_version="bad")
    assert err.value.status == 400 and needle in err.value.body
    assert json.loads(err.value.body)["success"] is False
    assert_same_generation(probe(engine.url), original_generation, tol=0.0)


def test_missing_dir_is_400(engine, tmp_path):
    r = requests.post(engine.url + "/update_weights_from_disk", json={"model_path": str(tmp_path / "nope")}, timeout=30)
    assert r.status_code == 400 and r.json()["success"] is False and "nope" in r.json()["message"]


def test_update_waits_for_in_flight_requests_when_not_paused(engine, tiny_model, perturbed_model):
    uninterrupted = requests.post(engine.url + "/generate", json=LONG, timeout=120).json()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: requests.post(engine.url + "/generate", json=LONG, timeout=120).json())
        wait_decoding(engine.url)
        update_engines_from_disk([engine.url], str(perturbed_model), weight_version="v2")
        out = fut.result(120)
    assert out["output_ids"] == uninterrupted["output_ids"]  # every token came from the old weights
    assert out["meta_info"]["weight_version"] == "v0"  # stamped when it finished, before the update
    update_engines_from_disk([engine.url], str(tiny_model), weight_version="v0")


def test_update_while_paused_applies_between_steps(engine, tiny_model, perturbed_model, reference_generation):
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: requests.post(engine.url + "/generate", json=LONG, timeout=120).json())
        wait_decoding(engine.url)
        assert requests.post(engine.url + "/pause_generation", json={"mode": "in_place"}, timeout=30).status_code == 200
        update_engines_from_disk([engine.url], str(perturbed_model), weight_version="v3")  # does not wait for the request
        assert not fut.done()
        requests.post(engine.url + "/continue_generation", json={}, timeout=30)
        out = fut.result(120)
    assert out["meta_info"]["finish_reason"]["type"] == "length" and out["meta_info"]["weight_version"] == "v3"
    assert_same_generation(probe(engine.url), reference_generation)
    update_engines_from_disk([engine.url], str(tiny_model), weight_version="v0")
