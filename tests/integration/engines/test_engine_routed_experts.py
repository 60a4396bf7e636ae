"""Routed-experts capture of the embedded engine on the tiny Qwen3-MoE (SGLang's wire format).

The engine's captured top-k must equal, position by position, what a teacher-forced HF forward's
router picks (fp32: exactly), for concurrent requests of different lengths that share batches.
"""

import base64
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from miles.engines.sglang import decode_routed_experts

FLAG = "--enable-return-routed-experts"


@pytest.fixture(scope="module")
def routed_engine(start_engine, tiny_moe_model):
    return start_engine(tiny_moe_model, FLAG)


def reference_topk(model, ids: list[int], top_k: int) -> np.ndarray:
    """Teacher-forced router top-k of every position, [len(ids), layers, top_k]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    per_layer = [torch.topk(torch.softmax(lg.float(), dim=-1), top_k, dim=-1).indices for lg in out.router_logits]
    return torch.stack(per_layer, dim=1).numpy()


def wait_state(engine, key: str, at_least: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.internal_state()[key] < at_least:
        assert time.monotonic() < deadline, f"{key} never reached {at_least}"
        time.sleep(0.01)


def test_routed_experts_match_teacher_forced_router(routed_engine, tiny_moe_model):
    """One long request decodes; three prompts of different lengths are prefilled together
    (left padding) and join its batch; routing must map to the right request and position."""
    cfg = AutoConfig.from_pretrained(tiny_moe_model)
    layers, top_k = cfg.num_hidden_layers, cfg.num_experts_per_tok
    rng = random.Random(0)
    first = {"input_ids": [5, 6, 7], "return_routed_experts": True,
             "sampling_params": {"max_new_tokens": 40, "temperature": 0.8, "sampling_seed": 1, "ignore_eos": True}}
    lengths, news = (11, 26, 6), (6, 10, 12)
    wave = {"input_ids": [[rng.randrange(3, 500) for _ in range(n)] for n in lengths],
            "return_routed_experts": True, "routed_experts_start_len": [0, 5, 0],
            "sampling_params": [{"max_new_tokens": k, "temperature": 0.8, "sampling_seed": k} for k in news]}
    base = routed_engine.internal_state()
    with ThreadPoolExecutor(2) as pool:
        f_first = pool.submit(routed_engine.generate, first)
        wait_state(routed_engine, "num_generated_tokens_total", base["num_generated_tokens_total"] + 3)
        assert routed_engine.post("/pause_generation", {"mode": "in_place"}).status_code == 200
        f_wave = pool.submit(routed_engine.generate, wave)
        wait_state(routed_engine, "num_waiting_reqs", 3)  # queued together: one prefill, then a join
        assert routed_engine.post("/continue_generation").status_code == 200
        outs = [f_first.result()] + f_wave.result()
    bodies = [first] + [{"input_ids": ids, "routed_experts_start_len": s}
                        for ids, s in zip(wave["input_ids"], wave["routed_experts_start_len"])]
    assert len(outs[0]["output_ids"]) == 40

    model = AutoModelForCausalLM.from_pretrained(tiny_moe_model, dtype=torch.float32).eval()
    for body, out in zip(bodies, outs):
        prompt, output = body["input_ids"], out["output_ids"]
        start = body.get("routed_experts_start_len", 0)
        raw = base64.b64decode(out["meta_info"]["routed_experts"])
        expected_rows = len(prompt) + len(output) - 1 - start
        assert len(raw) == expected_rows * layers * top_k * 4  # int32
        got = decode_routed_experts(out["meta_info"], layers, top_k)
        assert got.dtype == np.int32 and got.shape == (expected_rows, layers, top_k)
        ref = reference_topk(model, prompt + output[:-1], top_k)[start:]
        assert np.array_equal(got, ref), f"prompt of {len(prompt)}: {(got != ref).sum()} mismatched indices"


def test_routed_experts_off_unless_asked(routed_engine):
    out = routed_engine.generate({"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}})
    assert "routed_experts" not in out["meta_info"]
    r = routed_engine.post("/generate", {"input_ids": [5, 6, 7], "return_routed_experts": True,
                                         "routed_experts_start_len": 4})
    assert r.status_code == 400 and "routed_experts_start_len" in r.text


def test_routed_experts_need_the_server_flag(start_engine, tiny_moe_model):
    plain = start_engine(tiny_moe_model)
    r = plain.post("/generate", {"input_ids": [5, 6, 7], "return_routed_experts": True})
    assert r.status_code == 400 and FLAG in r.json()["error"]["message"]
