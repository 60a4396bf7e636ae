"""MoE at EP=2 on 2 gloo processes, for Qwen3-MoE and a GLM-4.5-style glm4_moe (dense first layer,
shared expert, sigmoid router with expert bias): each rank holds half the experts; logits equal
transformers'; the experts each rank exports are its own block, together the whole checkpoint, and
`ep_all_gather_experts` (what weight sync sends) gives every rank the whole checkpoint, bit-exact."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from miles.trainer import hf_convert

WORKER = Path(__file__).with_name("ep_worker.py")


@pytest.mark.parametrize("model_fixture", ["tiny_moe_model", "tiny_glm4_moe_model"])
def test_ep2_logits_and_export_match_hf(model_fixture, request, tmp_path, gloo_ranks):
    tiny = request.getfixturevalue(model_fixture)
    gen = torch.Generator().manual_seed(0)
    state = {n: (1 + 0.2 * torch.randn(t.shape, generator=gen)) if n.endswith("norm.weight")
             else 0.2 * torch.randn(t.shape, generator=gen)
             for n, t in sorted(hf_convert.load_hf_state_dict(tiny).items())}  # decisive routing
    ckpt = tmp_path / "moe"
    AutoConfig.from_pretrained(tiny).save_pretrained(ckpt)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    results, _ = gloo_ranks(WORKER, [ckpt, tmp_path / "out"], tmp_path / "out", 2)

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    worst = 0.0
    for res in results:
        for ids, got in zip(res["ids"], res["logits"]):
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0]
            worst = max(worst, (got - ref).abs().max().item())
    assert worst < 1e-5, worst

    owned = [{int(n.split(".experts.")[1].split(".")[0]) for n in r["weights"] if ".mlp.experts." in n}
             for r in results]
    assert owned == [{0, 1, 2, 3}, {4, 5, 6, 7}]  # each EP rank exports its own contiguous block
    merged = {**results[0]["weights"], **results[1]["weights"]}
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[k], state[k]) for k in state)
    for res in results:  # what weight sync sends: every expert (and router bias), from each rank
        assert res["gathered"].keys() == state.keys()
        assert all(torch.equal(res["gathered"][k], state[k]) for k in state)
