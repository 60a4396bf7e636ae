"""/generate of the embedded engine: logprob rule vs teacher forcing, seeds, batch form, errors, finish reasons.

The engine serves a copy of the tiny Qwen3 whose lm_head is scaled x10 (peaked logits,
so a wrong temperature or renormalisation shows) and whose EOS list is [2, X], X being a token the
greedy continuation of PROMPT0 reaches, so EOS stopping can be tested deterministically.
"""

import json
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT0 = [11, 57, 300, 42, 7]
HEAD_SCALE = 10.0
"""lm_head x10: logits std ~1.6 (max ~7) instead of ~0.16. Far larger heads make plain fp32 noise reach
1e-5: at logits std ~4.8 (x30), eager and sdpa full forwards of one unbatched sequence already differ by 9e-6."""
LOGPROB_TOL = 1e-5


def greedy_params(max_new_tokens: int, **extra) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, **extra}


def greedy_continuation(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def teacher_forced_logprobs(model, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """What a trainer recomputes: one forward over prompt + response, log_softmax(logits / T) of each response token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + output])).logits[0].float()
    t = temperature if temperature >= 1e-5 else 1.0
    lp = torch.log_softmax(logits / t, dim=-1)[len(prompt) - 1:-1]
    return lp.gather(1, torch.tensor(output)[:, None]).squeeze(1)


def wait_generated(engine, num_tokens: int, timeout_s: float = 30.0) -> None:
    """Wait until the engine has generated num_tokens more tokens than when called."""
    start = engine.internal_state()["num_generated_tokens_total"]
    deadline = time.monotonic() + timeout_s
    while engine.internal_state()["num_generated_tokens_total"] < start + num_tokens:
        assert time.monotonic() < deadline, "the engine is not generating"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def gen_model(tiny_model, tmp_path_factory):
    """(checkpoint dir, reference HF model in this process, greedy continuation of PROMPT0, index k of the EOS X)."""
    out = tmp_path_factory.mktemp("models") / "qwen3-tiny-peaked"
    shutil.copytree(tiny_model, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * HEAD_SCALE
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    greedy = greedy_continuation(model, PROMPT0, 16)
    k = next((i for i in range(2, 16) if greedy[i] not in greedy[:i] and greedy[i] != 2), 0)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((out / name).read_text())
        cfg["eos_token_id"] = [2, greedy[k]]
        (out / name).write_text(json.dumps(cfg))
    return out, model, greedy, k


@pytest.fixture(scope="module")
def gen_engine(start_engine, gen_model):
    return start_engine(gen_model[0])


def test_logprobs_match_teacher_forced_recompute_when_batched(gen_engine, gen_model):
    """Requests of different lengths and temperatures, joining a batch that is already decoding."""
    _, model, _, _ = gen_model
    rng = random.Random(1)
    first = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 80, "temperature": 0.0, "ignore_eos": True},
             "return_logprob": True}  # greedy: raw log_softmax
    bodies = []
    for i in range(10):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(2, 40))]  # different lengths: left padding
        params = {"max_new_tokens": 20, "temperature": (0.7, 1.0)[i % 2], "sampling_seed": 100 + i}
        if i % 3 == 2:  # truncation must not renormalise the reported logprob
            params.update(top_p=0.8, top_k=20)
        bodies.append({"input_ids": prompt, "sampling_params": params, "return_logprob": True})
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        futs = [pool.submit(gen_engine.generate, first)]
        wait_generated(gen_engine, 5)  # the later requests join a running batch (its cache gets merged)
        futs += [pool.submit(gen_engine.generate, b) for b in bodies[:7]]
        wait_generated(gen_engine, 30)  # a second wave joins a longer running cache
        futs += [pool.submit(gen_engine.generate, b) for b in bodies[7:]]
        outs = [f.result() for f in futs]
    bodies = [first] + bodies
    worst = 0.0
    for body, out in zip(bodies, outs):
        lps = out["meta_info"]["output_token_logprobs"]
        assert [tok for _, tok, _ in lps] == out["output_ids"] and all(text is None for _, _, text in lps)
        assert len(out["output_ids"]) == out["meta_info"]["completion_tokens"] >= 1
        ref = teacher_forced_logprobs(model, body["input_ids"], out["output_ids"], body["sampling_params"]["temperature"])
        worst = max(worst, (ref - torch.tensor([lp for lp, _, _ in lps])).abs().max().item())
    assert worst < LOGPROB_TOL, f"max |engine - teacher forced| = {worst}"
    # The scaled head makes the distribution peaked: sampled tokens are far more likely than uniform (-ln 512 = -6.24).
    assert max(lp for o in outs for lp, _, _ in o["meta_info"]["output_token_logprobs"]) > -3.0


def test_logprobs_match_in_batch_form(gen_engine, gen_model):
    _, model, _, _ = gen_model
    prompts = [[9, 8, 7], [100, 200, 300, 400, 17, 18, 19, 20, 21]]
    outs = gen_engine.generate({
        "input_ids": prompts, "return_logprob": True,
        "sampling_params": [{"max_new_tokens": 12, "temperature": 0.7, "seed": 1},
                            {"max_new_tokens": 7, "temperature": 1.0, "seed": 2}],
    })
    assert isinstance(outs, list) and len(outs) == 2
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 9]
    for prompt, out, t in zip(prompts, outs, (0.7, 1.0)):
        ref = teacher_forced_logprobs(model, prompt, out["output_ids"], t)
        got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        assert (ref - got).abs().max().item() < LOGPROB_TOL


def test_seeded_request_is_deterministic_alone_and_batched(gen_engine):
    body = {"input_ids": [40, 41, 42, 43], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 24, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 1234}}
    alone1, alone2 = gen_engine.generate(body), gen_engine.generate(body)
    assert alone1["output_ids"] == alone2["output_ids"]
    others = [{"input_ids": list(range(3, 3 + n)), "sampling_params": {"max_new_tokens": 30, "temperature": 1.0}}
              for n in (2, 9, 17, 30, 5, 12, 22)]
    for o in others[::2]:  # truncated neighbours must not change how the seeded row draws
        o["sampling_params"].update(top_p=0.9, top_k=30, min_p=0.01)
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(gen_engine.generate, b) for b in others[:4]] + [pool.submit(gen_engine.generate, body)]
        futs += [pool.submit(gen_engine.generate, b) for b in others[4:]]
        batched = futs[4].result()
        [f.result() for f in futs]
    assert batched["output_ids"] == alone1["output_ids"]
    lp = lambda o: torch.tensor([x[0] for x in o["meta_info"]["output_token_logprobs"]])  # noqa: E731
    assert (lp(batched) - lp(alone1)).abs().max().item() < LOGPROB_TOL
    other_seed = gen_engine.generate({**body, "sampling_params": {**body["sampling_params"], "sampling_seed": 99}})
    assert other_seed["output_ids"] != alone1["output_ids"]
    # "seed" is accepted as a synonym of SGLang's "sampling_seed"
    params = {k: v for k, v in body["sampling_params"].items() if k != "sampling_seed"}
    assert gen_engine.generate({**body, "sampling_params": {**params, "seed": 1234}})["output_ids"] == alone1["output_ids"]


def test_finish_reasons_eos_stop_token_length_ignore_eos(gen_engine, gen_model):
    _, _, greedy, k = gen_model
    eos_x = greedy[k]
    out = gen_engine.generate({"input_ids": PROMPT0, "sampling_params": {"max_new_tokens": 16, "temperature": 0}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos_x}
    assert out["output_ids"] == greedy[:k + 1]  # the matched EOS is kept in output_ids

    out = gen_engine.generate({"input_ids": PROMPT0, "sampling_params": greedy_params(16, ignore_eos=True)})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 16}
    assert out["output_ids"] == greedy and out["meta_info"]["completion_tokens"] == 16

    j = next(i for i in range(16) if greedy[i] not in greedy[:i] and greedy[i] != eos_x and i > 0)
    out = gen_engine.generate({"input_ids": PROMPT0, "sampling_params": {
        "max_new_tokens": 16, "temperature": 0, "ignore_eos": True, "stop_token_ids": [greedy[j]]}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": greedy[j]}
    assert out["output_ids"] == greedy[:j + 1]

    out = gen_engine.generate({"input_ids": PROMPT0, "sampling_params": greedy_params(3, ignore_eos=True)})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 3} and out["output_ids"] == greedy[:3]

    # min_new_tokens keeps the EOS out of the first k+1 tokens
    out = gen_engine.generate({"input_ids": PROMPT0, "sampling_params": greedy_params(16, min_new_tokens=k + 2)})
    assert eos_x not in out["output_ids"][:k + 1] and len(out["output_ids"]) >= k + 2


def test_response_shape_and_text_input(gen_engine, gen_model):
    tok = AutoTokenizer.from_pretrained(gen_model[0])
    out = gen_engine.generate({"text": "what is 12 + 30", "rid": "my-rid",
                               "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
    meta = out["meta_info"]
    assert set(out) == {"text", "output_ids", "meta_info"}
    assert meta["id"] == "my-rid" and meta["prompt_tokens"] == len(tok("what is 12 + 30")["input_ids"])
    assert meta["cached_tokens"] == 0 and meta["weight_version"] == "default" and meta["e2e_latency"] > 0
    assert "output_token_logprobs" not in meta
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    outs = gen_engine.generate({"text": ["a b", "one two three"], "rid": ["r1", "r2"], "sampling_params": {"max_new_tokens": 2}})
    assert [o["meta_info"]["id"] for o in outs] == ["r1", "r2"]


@pytest.mark.parametrize("body, needle", [
    ({"text": "hi", "input_ids": [1, 2]}, "exactly one of 'text' or 'input_ids'"),
    ({"sampling_params": {"max_new_tokens": 2}}, "exactly one of 'text' or 'input_ids'"),
    ({"input_ids": [5, 6], "sampling_params": {"max_new_token": 2}}, "max_new_token"),
    ({"input_ids": [5, 6], "sampling_params": {"top_p": 0.0}}, "top_p"),
    ({"input_ids": [5, 6], "stream": True}, "stream"),
    ({"input_ids": [5, 6], "bogus_field": 1}, "bogus_field"),
    ({"input_ids": [5, 100000]}, "outside the vocabulary"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [[5, 6], [7]], "sampling_params": [{}]}, "sampling_params has 1 entries for a batch of 2"),
])
def test_bad_requests_answer_400_naming_the_problem(gen_engine, body, needle):
    r = gen_engine.post("/generate", body)
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"]


def test_put_generate_is_accepted(gen_engine):
    r = requests.put(gen_engine.url + "/generate", json={
        "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}}, timeout=30)
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
