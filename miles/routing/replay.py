"""R3 in the trainer: replay the experts the rollout engine chose, through megatron-core's `RouterReplay`.

Legend: B samples in a micro-batch, S padded sequence length, L decoder layers, M MoE layers,
K experts per token (top_k), T = prompt + response - 1 (positions the engine's forward saw; the
last sampled token never went through the model).

Layers. A dump holds every decoder layer, SGLang's `routed_experts` layout (`num_hidden_layers`);
a dense layer (GLM-4.5's first `first_k_dense_replace`) routes nothing and holds zeros there.
Megatron has one RouterReplay per MoE layer, so `replay_targets` keeps the `moe_layers` (all
layers for Qwen3-MoE): M targets, in layer order, as RoutingReplay lists the routers.

Alignment. The engine's dump of a sample is int32 [T, L, K]: row t holds the experts token t was
routed to (prompt tokens first, then response tokens; requests are sent with
routed_experts_start_len=0, so the prompt is included). The trainer runs prompt + response
right-padded in [B, S], and megatron's router sees the hidden states [S, B, H] flattened
sequence-major, so layer l's replay target is [S * B, K] with row s * B + b = experts of token s
of sample b. Rows the engine never routed, the last real token and padding, get experts
0..K-1: their outputs feed only the logits of the last position and of padding, which no
log-prob reads (causal attention keeps them out of every earlier position).
Not covered: sequence packing (the trainer pads), and TP/SP slicing of the sequence dimension
(MoE with TP > 1 is refused by the model provider; with sequence parallelism each TP rank would
take its S / TP slice of these rows).

Modes (megatron's `RouterReplayAction`, set on this model's routers only):
- record: route normally and keep the chosen experts (`recorded()`), e.g. to compare with the engine;
- replay forward: use the targets instead of top-k; the gating weights are the router's own
  scores gathered at those experts, so gradients still reach the router;
- replay backward: during activation recomputation (trainer.recompute_granularity=full) the
  forward runs again inside backward; megatron pops the targets queued by the forward pass, so
  the recomputed forward routes exactly like the first one.
The actor switches from forward to backward mode in its loss function, which megatron's
schedule calls at the end of each micro-batch's forward, before that micro-batch's backward.
"""

from collections.abc import Sequence

import numpy as np
import torch

from miles.trainer.logprobs import PaddedBatch


class RoutingReplayError(ValueError):
    """A routing dump does not fit the sample or the model it is replayed into."""


def replay_targets(batch: PaddedBatch, routed_TLK: Sequence[np.ndarray | torch.Tensor], num_layers: int,
                   top_k: int, num_experts: int, sample_ids: Sequence[str] | None = None,
                   moe_layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per-MoE-layer replay targets [S * B, K] (int64, sequence-major rows) of one padded micro-batch.

    `routed_TLK[b]` is sample b's engine dump [T, L, K] with T = prompt_len + response_len - 1 and
    L = num_layers; `moe_layers` (default: all L) are the layers with a router, one target each.
    Expert ids are checked on those layers only (dense layers carry SGLang's zeros).
    Raises RoutingReplayError naming the sample on a shape or expert-id mismatch.
    """
    B, S = batch.input_ids_BS.shape
    if len(routed_TLK) != B:
        raise RoutingReplayError(f"{len(routed_TLK)} routing dumps for a micro-batch of {B} samples")
    layers = list(range(num_layers)) if moe_layers is None else list(moe_layers)
    if not layers or any(not 0 <= layer < num_layers for layer in layers):
        raise RoutingReplayError(f"moe_layers {layers} must be non-empty and lie in [0, {num_layers})")
    idx_SBMK = torch.arange(top_k, dtype=torch.long).expand(S, B, len(layers), top_k).clone()
    for b, dump in enumerate(routed_TLK):
        name = sample_ids[b] if sample_ids is not None else f"#{b}"
        dump_TLK = torch.as_tensor(np.asarray(dump), dtype=torch.long)
        tokens = batch.prompt_lens[b] + batch.response_lens[b] - 1
        if tuple(dump_TLK.shape) != (tokens, num_layers, top_k):
            raise RoutingReplayError(
                f"routing dump of sample {name} has shape {tuple(dump_TLK.shape)}, expected ({tokens}, {num_layers}, "
                f"{top_k}) = (prompt {batch.prompt_lens[b]} + response {batch.response_lens[b]} - 1, decoder layers, "
                f"top_k): was it recorded for another sample or another model?")
        routed_TMK = dump_TLK[:, layers]
        if tokens and (int(routed_TMK.min()) < 0 or int(routed_TMK.max()) >= num_experts):
            raise RoutingReplayError(f"routing dump of sample {name} holds expert ids outside [0, {num_experts})")
        idx_SBMK[:tokens, b] = routed_TMK
    return [idx_SBMK[:, :, m].reshape(S * B, top_k) for m in range(len(layers))]


class RoutingReplay:
    """Record / replay control of one model's MoE routers (megatron TopKRouter.router_replay).

    Only this model's routers are touched (not megatron's process-wide instance list), so an
    actor and its frozen reference model replay independently.
    """

    def __init__(self, model: torch.nn.Module):
        from megatron.core.transformer.moe.router import TopKRouter

        self.replays = [m.router_replay for m in model.modules()
                        if isinstance(m, TopKRouter) and getattr(m, "router_replay", None) is not None]
        if not self.replays:
            raise RoutingReplayError("the model has no replay-enabled MoE router (moe_enable_routing_replay "
                                     "is set by miles.trainer.model_provider for MoE models only)")

    @property
    def num_layers(self) -> int:
        return len(self.replays)

    def _act(self, action) -> None:
        for replay in self.replays:
            replay.set_router_replay_action(action)

    def record(self) -> None:
        """Route normally and keep each layer's chosen experts."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self.clear()
        self._act(RouterReplayAction.RECORD)

    def recorded(self) -> list[torch.Tensor]:
        """Each layer's experts of the last recorded forward, [S * B, K] (sequence-major rows)."""
        out = [replay.get_recorded_indices() for replay in self.replays]
        if any(t is None for t in out):
            raise RuntimeError("nothing recorded: call record() before the forward pass")
        return out

    def replay_forward(self, targets: Sequence[torch.Tensor]) -> None:
        """Use `targets` (one [S * B, K] tensor per layer) in the next forward, and queue them for
        the recomputation in its backward."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if len(targets) != len(self.replays):
            raise RoutingReplayError(f"{len(targets)} layers of replay targets for {len(self.replays)} MoE layers")
        for replay, target in zip(self.replays, targets):
            replay.set_target_indices(target)
        self._act(RouterReplayAction.REPLAY_FORWARD)

    def replay_backward(self) -> None:
        """Forward done: a recomputation in backward pops the queued targets."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._act(RouterReplayAction.REPLAY_BACKWARD)

    def clear(self) -> None:
        """Back to normal routing; drop targets, queues and recordings."""
        for replay in self.replays:
            replay.clear_indices()
            replay.clear_router_replay_action()
