"""The engine's routed-experts capture is what its experts actually computed with.

A forward pre-hook on every layer's experts block records the expert indices the MoE block feeds
it (the experts the engine *used*). RouterCapture (what `/generate` serves as `routed_experts`)
must equal them, also when `--router-selection-noise` makes the routers choose differently from the
plain top-k (which this test checks too, so the equality is not the trivial one).
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from miles.engines.embedded.routing import RouterCapture, perturb_router_selection


def _used_experts(model) -> list:
    used: list = [None] * len(model.model.layers)

    def hook(layer):
        def pre(module, args):
            used[layer] = args[1].detach().clone()  # Qwen3MoeExperts(hidden, top_k_index, top_k_weights)
        return pre

    for i, layer in enumerate(model.model.layers):
        layer.mlp.experts.register_forward_pre_hook(hook(i))
    return used


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_capture_equals_experts_used(tiny_moe_model, noise):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_moe_model), dtype=torch.float32).eval()
    if noise:
        perturb_router_selection(model, noise)
    capture = RouterCapture(model)
    used = _used_experts(model)
    ids = torch.randint(3, 500, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    captured_NYK = capture.take(ids.numel())
    used_NYK = torch.stack([u.reshape(-1, capture.top_k) for u in used], dim=1).to(torch.int32)
    assert torch.equal(captured_NYK, used_NYK)
    plain = torch.stack([torch.topk(lg.float(), capture.top_k, dim=-1).indices for lg in out.router_logits], dim=1)
    same_set = (np.sort(plain.numpy(), -1) == np.sort(captured_NYK.numpy(), -1)).all(-1).mean()
    if noise:
        assert same_set < 0.5, same_set  # the perturbed engine really routes elsewhere
    else:
        assert same_set == 1.0
