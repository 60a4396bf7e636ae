"""The embedded engine on the tiny Qwen3-MoE: batched logprobs, and per-expert HF names in weight updates."""

import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def teacher_forced(model, prompt, output, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + output])).logits[0].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1:-1]
    return lp.gather(1, torch.tensor(output)[:, None]).squeeze(1)


def sampled_batch(engine, seed: int):
    rng = random.Random(seed)
    bodies = [{"input_ids": [rng.randrange(3, 500) for _ in range(n)], "return_logprob": True,
               "sampling_params": {"max_new_tokens": 12, "temperature": 0.8, "sampling_seed": n}} for n in (3, 11, 26, 6)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        return bodies, list(pool.map(engine.generate, bodies))


def max_logprob_diff(model, bodies, outs) -> float:
    worst = 0.0
    for body, out in zip(bodies, outs):
        ref = teacher_forced(model, body["input_ids"], out["output_ids"], 0.8)
        got = torch.tensor([x[0] for x in out["meta_info"]["output_token_logprobs"]])
        worst = max(worst, (ref - got).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def moe_engine(start_engine, tiny_moe_model):
    return start_engine(tiny_moe_model)


def test_moe_logprobs_and_per_expert_update(moe_engine, tiny_moe_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_model, dtype=torch.float32).eval()
    bodies, outs = sampled_batch(moe_engine, 0)
    assert max_logprob_diff(model, bodies, outs) < 1e-5

    # Perturb only expert tensors, in the Hub's per-expert naming; the engine holds them fused.
    weights = load_file(str(tiny_moe_model / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    experts = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in weights.items() if ".mlp.experts." in k}
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in experts
    new_dir = tmp_path / "moe-new"
    shutil.copytree(tiny_moe_model, new_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({**weights, **experts}, str(new_dir / "model.safetensors"))
    upd_dir = tmp_path / "moe-experts-only"
    upd_dir.mkdir()
    save_file(experts, str(upd_dir / "model.safetensors"))
    r = moe_engine.post("/update_weights_from_disk", {"model_path": str(upd_dir), "weight_version": "experts"})
    assert r.status_code == 200 and r.json()["success"] is True, r.text

    for name in ("model.layers.1.mlp.experts.5.up_proj.weight", "model.layers.0.mlp.experts.2.down_proj.weight",
                 "model.layers.0.mlp.experts.7.gate_proj.weight"):
        got = moe_engine.post("/get_weights_by_name", {"name": name, "truncate_size": 1000}).json()
        assert torch.equal(torch.tensor(got), experts[name]), name
    new_model = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32).eval()
    bodies, outs = sampled_batch(moe_engine, 1)
    assert max_logprob_diff(new_model, bodies, outs) < 1e-5
    assert max_logprob_diff(model, bodies, outs) > 1e-3  # and the old experts no longer explain the outputs
