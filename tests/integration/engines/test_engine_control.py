"""Control endpoints of the embedded engine: health and info shapes, abort, pause/continue, weights readout."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

LONG = {"max_new_tokens": 1500, "temperature": 1.0, "ignore_eos": True}


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_long(engine, pool, rid: str, **params):
    """Submit a long request in the background; return its future once the engine is decoding it."""
    before = engine.internal_state()["num_generated_tokens_total"]
    fut = pool.submit(engine.generate, {"input_ids": [7, 8, 9], "rid": rid, "return_logprob": True,
                                        "sampling_params": {**LONG, **params}})
    wait_for(lambda: engine.internal_state()["num_generated_tokens_total"] > before + 2, what=f"{rid} to decode")
    return fut


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as p:
        yield p


def test_health_and_info_shapes(engine, tiny_model):
    assert engine.get("/health").status_code == 200
    assert engine.get("/health_generate").status_code == 200
    for path in ("/model_info", "/get_model_info"):
        info = engine.get(path).json()
        assert info["model_path"] == str(tiny_model) and info["is_generation"] is True
        assert info["weight_version"] == "default" and info["architectures"] == ["Qwen3ForCausalLM"]
    for path in ("/server_info", "/get_server_info"):
        info = engine.get(path).json()
        assert info["version"].startswith("embedded-") and info["dtype"] == "float32"
        assert info["max_batch_size"] == 64 and info["model_path"] == str(tiny_model)
        assert info["torch_num_threads"] == 1  # --num-threads 1 (conftest), read on the worker thread
        (state,) = info["internal_states"]
        assert set(state) == {"num_requests_total", "num_running_reqs", "num_waiting_reqs", "num_generated_tokens_total"}
    before = engine.internal_state()
    engine.generate({"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}})
    after = engine.internal_state()
    assert after["num_requests_total"] == before["num_requests_total"] + 1
    assert after["num_generated_tokens_total"] == before["num_generated_tokens_total"] + 5
    assert after["num_running_reqs"] == after["num_waiting_reqs"] == 0


def test_cache_and_memory_endpoints(engine):
    r = engine.post("/flush_cache")
    assert r.status_code == 200 and r.text == "Cache flushed."
    for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        r = engine.post(path, {"tags": None})
        assert r.status_code == 200 and r.json() is None


def test_get_weights_by_name(engine, tiny_model):
    ckpt = load_file(str(tiny_model / "model.safetensors"))
    rows = engine.post("/get_weights_by_name", {"name": "model.layers.1.mlp.up_proj.weight", "truncate_size": 3}).json()
    assert torch.equal(torch.tensor(rows), ckpt["model.layers.1.mlp.up_proj.weight"][:3])
    norm = engine.post("/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 5}).json()
    assert norm == ckpt["model.norm.weight"][:5].tolist()
    r = engine.post("/get_weights_by_name", {"name": "model.nope.weight"})
    assert r.status_code == 400 and "model.nope.weight" in r.json()["error"]["message"]


def test_abort_by_rid_returns_tokens_so_far(engine, pool):
    fut = start_long(engine, pool, "victim")
    keeper = pool.submit(engine.generate, {"input_ids": [5], "rid": "keeper",
                                           "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}})
    assert engine.post("/abort_request", {"rid": "victim"}).status_code == 200
    out = fut.result(60)
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and isinstance(meta["finish_reason"]["message"], str)
    assert 0 < meta["completion_tokens"] < LONG["max_new_tokens"]
    assert len(out["output_ids"]) == len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    assert keeper.result(60)["meta_info"]["finish_reason"] == {"type": "length", "length": 40}


def test_abort_all(engine, pool):
    futs = [start_long(engine, pool, f"all-{i}") for i in range(2)]
    assert engine.post("/abort_request", {"rid": "", "abort_all": True}).status_code == 200
    assert all(f.result(60)["meta_info"]["finish_reason"]["type"] == "abort" for f in futs)


def test_pause_in_place_freezes_decoding_and_queues_new_requests(engine, pool):
    fut = start_long(engine, pool, "frozen", max_new_tokens=300)
    r = engine.post("/pause_generation", {"mode": "in_place"})
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["message"]
    frozen = engine.internal_state()
    time.sleep(0.3)
    assert engine.internal_state()["num_generated_tokens_total"] == frozen["num_generated_tokens_total"]
    assert frozen["num_running_reqs"] == 1
    late = pool.submit(engine.generate, {"input_ids": [4, 4], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})
    wait_for(lambda: engine.internal_state()["num_waiting_reqs"] == 1, what="the late request to queue")
    assert engine.get("/health").status_code == 200  # the HTTP side stays responsive while paused
    assert not fut.done() and not late.done()
    r = engine.post("/continue_generation", {"torch_empty_cache": True})
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert fut.result(60)["meta_info"]["finish_reason"] == {"type": "length", "length": 300}
    assert late.result(60)["meta_info"]["completion_tokens"] == 3


def test_pause_abort_aborts_in_flight(engine, pool):
    fut = start_long(engine, pool, "paused-abort")
    assert engine.post("/pause_generation", {"mode": "abort"}).json()["status"] == "ok"
    assert fut.result(60)["meta_info"]["finish_reason"]["type"] == "abort"
    late = pool.submit(engine.generate, {"input_ids": [4], "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}})
    wait_for(lambda: engine.internal_state()["num_waiting_reqs"] == 1, what="the late request to queue")
    engine.post("/continue_generation", {})
    assert late.result(60)["meta_info"]["completion_tokens"] == 2


def test_pause_retract_then_continue_gives_the_uninterrupted_result(engine, pool):
    params = {"max_new_tokens": 400, "sampling_seed": 77}
    body = {"input_ids": [7, 8, 9], "return_logprob": True, "sampling_params": {**LONG, **params}}
    reference = engine.generate(body)
    fut = start_long(engine, pool, "retracted", **params)
    assert engine.post("/pause_generation", {"mode": "retract"}).json()["status"] == "ok"
    state = engine.internal_state()
    assert state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 1  # moved back to the queue
    engine.post("/continue_generation", {})
    out = fut.result(60)
    assert out["output_ids"] == reference["output_ids"]  # re-prefilled prompt + tokens so far, same seed stream
    got = torch.tensor([x[0] for x in out["meta_info"]["output_token_logprobs"]])
    ref = torch.tensor([x[0] for x in reference["meta_info"]["output_token_logprobs"]])
    assert (got - ref).abs().max().item() < 1e-5


def test_bad_pause_mode_is_400(engine):
    r = engine.post("/pause_generation", {"mode": "sideways"})
    assert r.status_code == 400 and "sideways" in r.json()["error"]["message"]


def test_update_weight_version(engine):
    r = engine.post("/update_weight_version", {"new_version": "v7"})
    assert r.status_code == 200 and r.json()["success"] is True
    out = engine.generate({"input_ids": [3], "sampling_params": {"max_new_tokens": 1}})
    assert out["meta_info"]["weight_version"] == "v7"
    assert engine.get("/model_info").json()["weight_version"] == "v7"
