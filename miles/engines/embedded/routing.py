"""Capture of the experts each token was routed to, for `--enable-return-routed-experts`.

Tensor legend: N = rows of one forward (batch x length, flattened as the MoE block does),
Y = layers, K = experts per token (top_k).

A forward hook on every MoE layer's router (`layer.mlp.gate`: transformers' Qwen3-MoE
`Qwen3MoeTopKRouter` and GLM-4.5's `Glm4MoeTopkRouter`, whose forwards return
`(logits, weights, indices)` and whose indices are what the MoE block hands its experts) keeps the
int top-k indices of the last forward. `take` stacks them into `[N, Y, K]` int32, the per-token
layout of SGLang's `meta_info.routed_experts`. Y is every decoder layer, as in SGLang; a dense layer
(GLM's first `first_k_dense_replace`) routes nothing and holds zeros, as SGLang's capture buffer
does (miles.routing.replay picks the MoE layers). Order of the K experts: as the router's top-k
returns them (Qwen3-MoE: highest probability first; GLM: torch.topk(sorted=False), no meaning, so
compare GLM routing as sets). The model runner maps rows to requests and positions.
"""

import base64
import logging
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class RouterCapture:
    """Forward hooks on each MoE layer's router; `take()` returns the last forward's top-k indices, all layers."""

    def __init__(self, model):
        routers = _layer_routers(model)
        self.moe_layers = [i for i, r in enumerate(routers) if r is not None]
        if not self.moe_layers:
            raise ValueError(f"--enable-return-routed-experts needs an MoE model; {type(model).__name__} has no "
                             "layer with a top-k router")
        self.num_layers = len(routers)
        self.top_k = int(routers[self.moe_layers[0]].top_k)
        self._last: dict[int, torch.Tensor] = {}
        self._handles = [routers[i].register_forward_hook(self._hook(i)) for i in self.moe_layers]
        logger.info("capturing routed experts: %d layers (%d MoE), top_k %d", self.num_layers, len(self.moe_layers),
                    self.top_k)

    def _hook(self, layer: int):
        def hook(module, args, out) -> None:
            if not (isinstance(out, tuple) and len(out) == 3):
                raise RuntimeError(f"router of layer {layer} ({type(module).__name__}) returned {type(out).__name__}, "
                                   "not (logits, weights, indices): this transformers version routes elsewhere, "
                                   "and miles' routed-experts capture does not support it")
            self._last[layer] = out[2]

        return hook

    def take(self, num_rows: int) -> torch.Tensor:
        """The last forward's indices as int32 [N, Y, K] on CPU (dense layers: zeros); clears them."""
        missing = [i for i in self.moe_layers if i not in self._last]
        assert not missing, f"no router output captured for layers {missing}"
        idx_NYK = torch.zeros(num_rows, self.num_layers, self.top_k, dtype=torch.int32)
        for layer, idx in self._last.items():
            idx_NK = idx.reshape(-1, self.top_k)
            assert idx_NK.shape[0] == num_rows, f"captured {idx_NK.shape[0]} router rows, expected {num_rows}"
            idx_NYK[:, layer] = idx_NK.to("cpu", torch.int32)
        self._last = {}
        return idx_NYK

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def perturb_router_selection(model, scale: float, seed: int = 0) -> None:
    """Study knob (`--router-selection-noise`): make this engine's expert *choice* differ from the trainer's.

    Every router picks its top-k from logits of a perturbed weight W + scale * std(W) * N(0, 1)
    (a fixed draw per layer from `seed`), while the gating weights stay those of W gathered at the
    chosen experts (Qwen3-MoE: softmax(W h); GLM: sigmoid(W h), renormalised, times
    routed_scaling_factor; GLM's choice adds e_score_correction_bias and keeps its group limit).
    Tokens whose top-k is nearly tied then go to other experts than an unperturbed model would
    pick, which is what bf16 or kernel differences do at scale; the numbers are otherwise unchanged,
    so with R3 (the trainer replaying these choices) engine and trainer log-probs agree to the
    non-routing noise floor (docs/r3.md).
    """
    routers = _layer_routers(model)
    if not any(r is not None for r in routers):
        raise ValueError(f"{type(model).__name__} is not an MoE model: no layer has a top-k router")
    for layer, gate in enumerate(routers):
        if gate is None:
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + layer)
        weight = gate.weight.detach()
        delta = (torch.randn(weight.shape, generator=gen, dtype=torch.float32) * scale * weight.float().std()).to(
            weight.device, weight.dtype)
        biased = hasattr(gate, "e_score_correction_bias")
        gate.forward = partial(_sigmoid_forward if biased else _softmax_forward, gate=gate, delta=delta)
    logger.warning("router selection perturbed (scale %g, seed %d): engine routing deliberately differs", scale, seed)


def _softmax_forward(hidden_states, gate, delta):
    """Qwen3MoeTopKRouter.forward with the choice made on W + delta."""
    hidden = hidden_states.reshape(-1, gate.hidden_dim)
    logits = F.linear(hidden, gate.weight)
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    _, indices = torch.topk(F.linear(hidden, gate.weight + delta), gate.top_k, dim=-1)
    top = probs.gather(1, indices)
    if gate.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), indices


def _sigmoid_forward(hidden_states, gate, delta):
    """Glm4MoeTopkRouter.forward (transformers 5.24) with the choice made on W + delta."""
    hidden = hidden_states.reshape(-1, gate.hidden_dim).float()
    logits = F.linear(hidden, gate.weight.float())
    scores = logits.sigmoid()
    choice_NE = F.linear(hidden, (gate.weight + delta).float()).sigmoid() + gate.e_score_correction_bias
    n, e = choice_NE.shape
    per_group = e // gate.num_group
    group_scores = choice_NE.view(n, gate.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    keep = torch.zeros_like(group_scores)
    keep.scatter_(1, torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1], 1)
    allowed = keep.unsqueeze(-1).expand(n, gate.num_group, per_group).reshape(n, e).bool()
    indices = torch.topk(choice_NE.masked_fill(~allowed, float("-inf")), k=gate.top_k, dim=-1, sorted=False)[1]
    top = scores.gather(1, indices)
    if gate.norm_topk_prob:
        top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, top * gate.routed_scaling_factor, indices


def _layer_routers(model) -> list:
    """Each decoder layer's top-k router (`layer.mlp.gate` with a `top_k`), None for a dense layer."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: routed-experts capture needs a decoder LM")
    routers = [getattr(getattr(layer, "mlp", None), "gate", None) for layer in layers]
    return [r if r is not None and hasattr(r, "top_k") else None for r in routers]


def encode_routed_experts(idx_TYK: torch.Tensor) -> str:
    """SGLang's wire form: base64 of the raw int32 bytes of [tokens, layers, top_k] (C order)."""
    return base64.b64encode(np.ascontiguousarray(idx_TYK.numpy(), dtype=np.int32).tobytes()).decode("ascii")
