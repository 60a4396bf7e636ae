"""Capture of the experts each token was routed to, for `--enable-return-routed-experts`.

Tensor legend: N = rows of one forward (batch x length, flattened as the MoE block does),
Y = layers, K = experts per token (top_k).

A forward hook on every decoder layer's router (`layer.mlp.gate`, transformers' Qwen3-MoE
`Qwen3MoeTopKRouter`, whose forward returns `(logits, scores, indices)`) keeps the int top-k
indices of the last forward. `take` stacks them into `[N, Y, K]` int32, the per-token layout of
SGLang's `meta_info.routed_experts` (order of the K experts: as the router's top-k returns them,
highest probability first). The model runner maps rows to requests and positions.
"""

import base64
import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


class RouterCapture:
    """Forward hooks on each layer's router; `take()` returns the last forward's top-k indices."""

    def __init__(self, model):
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(f"{type(model).__name__} has no model.layers: routed-experts capture needs a decoder LM")
        routers = [getattr(getattr(layer, "mlp", None), "gate", None) for layer in layers]
        dense = [i for i, r in enumerate(routers) if r is None or not hasattr(r, "top_k")]
        if dense:
            raise ValueError(
                f"--enable-return-routed-experts needs an MoE router in every layer; layers {dense} of "
                f"{type(model).__name__} have none (a dense model, or mlp_only_layers / decoder_sparse_step)"
            )
        self.num_layers = len(routers)
        self.top_k = int(routers[0].top_k)
        self._last: list[torch.Tensor | None] = [None] * self.num_layers
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers)]
        logger.info("capturing routed experts: %d layers, top_k %d", self.num_layers, self.top_k)

    def _hook(self, layer: int):
        def hook(module, args, out) -> None:
            self._last[layer] = out[2]

        return hook

    def take(self, num_rows: int) -> torch.Tensor:
        """The last forward's indices as int32 [N, Y, K] on CPU; clears them."""
        missing = [i for i, t in enumerate(self._last) if t is None]
        assert not missing, f"no router output captured for layers {missing}"
        idx_NYK = torch.stack([t.reshape(-1, self.top_k) for t in self._last], dim=1).to("cpu", torch.int32)
        assert idx_NYK.shape[0] == num_rows, f"captured {idx_NYK.shape[0]} router rows, expected {num_rows}"
        self._last = [None] * self.num_layers
        return idx_NYK

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def perturb_router_selection(model, scale: float, seed: int = 0) -> None:
    """Study knob (`--router-selection-noise`): make this engine's expert *choice* differ from the trainer's.

    Every router picks its top-k from logits of a perturbed weight W + scale * std(W) * N(0, 1)
    (a fixed draw per layer from `seed`), while the gating weights stay softmax(W h) gathered at
    the chosen experts. Tokens whose top-k is nearly tied then go to other experts than an
    unperturbed model would pick, which is what bf16 or kernel differences do at scale; the
    numbers are otherwise unchanged, so with R3 (the trainer replaying these choices) engine and
    trainer log-probs agree to the non-routing noise floor (docs/r3.md).
    """
    import torch.nn.functional as F

    for layer, gate in enumerate(_routers(model)):
        gen = torch.Generator().manual_seed(seed * 1000 + layer)
        weight = gate.weight.detach()
        delta = (torch.randn(weight.shape, generator=gen, dtype=torch.float32) * scale * weight.float().std()).to(
            weight.device, weight.dtype)

        def forward(hidden_states, gate=gate, delta=delta):
            hidden = hidden_states.reshape(-1, gate.hidden_dim)
            logits = F.linear(hidden, gate.weight)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            _, indices = torch.topk(F.linear(hidden, gate.weight + delta), gate.top_k, dim=-1)
            top = probs.gather(1, indices)
            if gate.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), indices

        gate.forward = forward
    logger.warning("router selection perturbed (scale %g, seed %d): engine routing deliberately differs", scale, seed)


def _routers(model) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    routers = [getattr(getattr(layer, "mlp", None), "gate", None) for layer in layers]
    if not routers or any(r is None or not hasattr(r, "top_k") for r in routers):
        raise ValueError(f"{type(model).__name__} is not an MoE model with a router in every layer")
    return routers


def encode_routed_experts(idx_TYK: torch.Tensor) -> str:
    """SGLang's wire form: base64 of the raw int32 bytes of [tokens, layers, top_k] (C order)."""
    return base64.b64encode(np.ascontiguousarray(idx_TYK.numpy(), dtype=np.int32).tobytes()).decode("ascii")
