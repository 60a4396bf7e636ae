"""The engine's routed-experts capture on GLM-4.5-style MoE (glm4_moe: dense first layer, sigmoid
router with e_score_correction_bias, group-limited top-k) is what its experts actually computed with.

As test_routing_capture.py: a forward pre-hook on every MoE layer's experts block records the
indices the block hands its experts; RouterCapture must equal them on the MoE layers and hold zeros
on the dense layer (SGLang's layout), also with `--router-selection-noise`, which must then really
route elsewhere (so the equality is not the trivial one). Weights are redrawn at std 0.2, so the
router logits, not only the bias, decide.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from miles.engines.embedded.routing import RouterCapture, perturb_router_selection

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", params=["glm45", "grouped"])
def glm4_checkpoint(request, tiny_glm4_moe_model, tmp_path_factory) -> Path:
    src = tiny_glm4_moe_model
    if request.param == "grouped":
        src = tmp_path_factory.mktemp("models") / "glm4-grouped"
        subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(src), "--glm4-moe",
                        "--layers", "3", "--n-group", "2", "--topk-group", "1"],
                       check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return src


def _used_experts(model) -> dict:
    used: dict = {}

    def hook(layer):
        def pre(module, args):
            used[layer] = args[1].detach().clone()  # Glm4MoeExperts(hidden, top_k_index, top_k_weights)
        return pre

    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.register_forward_pre_hook(hook(i))
    return used


def _capture(model, ids) -> torch.Tensor:
    capture = RouterCapture(model)
    with torch.no_grad():
        model(ids)
    out = capture.take(ids.numel())
    capture.remove()
    return out


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_glm4_capture_equals_experts_used(glm4_checkpoint, redrawn_checkpoint, tmp_path, noise):
    ckpt = tmp_path / "redrawn"
    redrawn_checkpoint(glm4_checkpoint, ckpt)
    ids = torch.randint(3, 500, (3, 17), generator=torch.Generator().manual_seed(0))
    plain_NYK = _capture(AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval(), ids)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    if noise:
        perturb_router_selection(model, noise)
    used = _used_experts(model)
    captured_NYK = _capture(model, ids)
    assert sorted(used) == [1, 2] and captured_NYK.shape == (ids.numel(), 3, 2)
    assert torch.equal(captured_NYK[:, 0], torch.zeros_like(captured_NYK[:, 0]))  # the dense layer
    for layer, idx in used.items():
        assert torch.equal(captured_NYK[:, layer], idx.reshape(-1, 2).to(torch.int32))
    if "grouped" in glm4_checkpoint.name:  # topk_group 1 of 2 groups: both experts in one group of 4
        group_NMK = captured_NYK[:, 1:] // 4
        assert torch.equal(group_NMK[..., 0], group_NMK[..., 1])
        assert set(group_NMK.unique().tolist()) == {0, 1}
    same_set = (np.sort(plain_NYK.numpy(), -1) == np.sort(captured_NYK.numpy(), -1)).all(-1)[:, 1:].mean()
    if noise:
        assert same_set < 0.5, same_set  # the perturbed engine really routes elsewhere
    else:
        assert same_set == 1.0
