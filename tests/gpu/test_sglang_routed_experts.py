"""Routed-experts capture (R3) from real SGLang on the tiny Qwen3-MoE (8 experts, top-2, 2 layers).

The server gets --enable-return-routed-experts (chosen by the adapter because the checkpoint is
MoE); requests ask for return_routed_experts. meta_info.routed_experts is base64 of int32 and
decodes to [prompt + completion - 1, layers, top_k] with every index in [0, 8). The expert sets
are compared with HF transformers' router top-k (fp32, teacher-forced on the same tokens): bf16
noise in SGLang may flip near-ties, so the agreement is reported and must be >= 90%.
"""

import json

import pytest
import requests
import torch

from miles.engines.sglang import decode_routed_experts

from .conftest import free_cuda, is_rehearsal

pytestmark = pytest.mark.gpu(count=2)

PROMPTS = [[5, 17, 42, 99, 123, 256, 500], [9, 10], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310]]
NUM_NEW_TOKENS = 12
MIN_AGREEMENT = 0.9


def hf_router_topk(model_path, tokens: list[int], top_k: int, device: str) -> torch.Tensor:
    """[len(tokens), layers, top_k] expert ids of each position's router top-k (sorted), HF fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens], device=device), output_router_logits=True)
    logits_LTE = torch.stack([r.float().reshape(len(tokens), -1) for r in out.router_logits])
    del model
    free_cuda()
    return logits_LTE.topk(top_k, dim=-1).indices.sort(dim=-1).values.permute(1, 0, 2).cpu()


def test_routed_experts_capture(engine_slot, moe_model, record):
    if is_rehearsal():
        pytest.skip("the embedded engine has no routed-experts capture; real SGLang only")
    cfg = json.loads((moe_model / "config.json").read_text())
    num_layers, top_k = cfg["num_hidden_layers"], cfg["num_experts_per_tok"]
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    engine = engine_slot.start(moe_model)
    assert engine.info is not None and engine.info.return_routed_experts
    body = {"input_ids": PROMPTS, "return_logprob": True, "return_routed_experts": True,
            "sampling_params": {"max_new_tokens": NUM_NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}}
    r = requests.post(engine.url + "/generate", json=body, timeout=600)
    assert r.status_code == 200, r.text[:2000]

    agree = total = 0
    shapes = []
    for prompt, out in zip(PROMPTS, r.json(), strict=True):
        completion = out["output_ids"]
        experts_TLK = decode_routed_experts(out["meta_info"], num_layers, top_k)
        shapes.append(list(experts_TLK.shape))
        assert experts_TLK.shape == (len(prompt) + len(completion) - 1, num_layers, top_k)
        assert experts_TLK.min() >= 0 and experts_TLK.max() < num_experts
        # top-k distinct experts per token and layer
        assert (torch.from_numpy(experts_TLK.copy()).sort(-1).values.diff(dim=-1) > 0).all()
        tokens = prompt + completion[:-1]  # the last sampled token never went through the model
        ref_TLK = hf_router_topk(moe_model, tokens, top_k, "cuda:0" if torch.cuda.is_available() else "cpu")
        got_TLK = torch.from_numpy(experts_TLK.copy()).long().sort(dim=-1).values
        agree += (got_TLK == ref_TLK).all(dim=-1).sum().item()
        total += got_TLK.shape[0] * num_layers
    record("routed_experts", {"shapes": shapes, "layers": num_layers, "top_k": top_k, "experts": num_experts,
                              "agreement_with_hf_fp32": round(agree / total, 4), "token_layers": total})
    assert agree / total >= MIN_AGREEMENT
