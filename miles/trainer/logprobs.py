"""Per-token log-probs and entropy of response tokens from vocab-parallel logits, or from the
final hidden states and the output layer without logits (trainer.logprob_impl=chunked).

Legend: B batch (samples in a micro-batch), S padded sequence length, V vocabulary size,
Vp this TP rank's vocabulary slice (V / tp_size), H hidden size, R a sample's response length.

Conventions:
- The logits at position t predict token t+1, so the log-prob of token t comes from the logits at
  position t-1; `PaddedBatch.targets_BS[:, t]` is token t+1 and `response_mask_BS[:, t]` marks
  the positions whose target is a response token.
- Temperature: both quantities use `logits / T`, the distribution the rollout engine sampled
  from (SGLang returns log_softmax(logits / T) of the sampled token).
- Results are fp32 and differentiable with respect to the logits (or the hidden states and the
  output weight).

`ForwardOutput` is what one micro-batch's forward hands the actor's loss functions: full logits,
or the hidden states + output weight; `logprobs_and_entropy` gives the same numbers either way
(within fp32 rounding; in bf16 the chunked path does not round the logits to bf16 first).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from miles.errors import ConfigError


@dataclass(frozen=True)
class PaddedBatch:
    """A right-padded micro-batch of prompt+response sequences, ready for GPTModel.forward."""

    input_ids_BS: torch.Tensor
    """Token ids, padded on the right with the pad id."""
    position_ids_BS: torch.Tensor
    """0..S-1 on every row (right padding keeps real positions unchanged)."""
    attention_mask_11SS: torch.Tensor | None
    """None means causal (SDPACoreAttention); else a bool causal mask, True = masked (Megatron)."""
    targets_BS: torch.Tensor
    """targets_BS[:, t] = input_ids_BS[:, t + 1] (pad id at the last position)."""
    response_mask_BS: torch.Tensor
    """True where targets_BS is a response token."""
    prompt_lens: tuple[int, ...]
    """Prompt length of each sample."""
    response_lens: tuple[int, ...]
    """Response length of each sample."""


def causal_mask_11SS(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron-convention causal mask: [1, 1, S, S] bool, True above the diagonal (masked)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


def build_padded_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    pad_to_multiple_of: int = 1,
    explicit_mask: bool = False,
    device: torch.device | str = "cpu",
) -> PaddedBatch:
    """Right-pad prompt+response token lists into one batch.

    `explicit_mask=True` builds the causal mask tensor (needed by megatron's DotProductAttention;
    SDPACoreAttention treats None as causal and is faster without it).
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response per prompt and at least one sample, got {len(prompts)} "
                         f"prompts and {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    seq_len = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids_BS = torch.full((len(prompts), seq_len), pad_id, dtype=torch.long)
    response_mask_BS = torch.zeros((len(prompts), seq_len), dtype=torch.bool)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids_BS[b, : lengths[b]] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        response_mask_BS[b, len(prompt) - 1 : lengths[b] - 1] = True
    targets_BS = torch.full_like(input_ids_BS, pad_id)
    targets_BS[:, :-1] = input_ids_BS[:, 1:]
    position_ids_BS = torch.arange(seq_len, dtype=torch.long).expand(len(prompts), seq_len).contiguous()
    return PaddedBatch(
        input_ids_BS=input_ids_BS.to(device),
        position_ids_BS=position_ids_BS.to(device),
        attention_mask_11SS=causal_mask_11SS(seq_len, device) if explicit_mask else None,
        targets_BS=targets_BS.to(device),
        response_mask_BS=response_mask_BS.to(device),
        prompt_lens=tuple(len(p) for p in prompts),
        response_lens=tuple(len(r) for r in responses),
    )


def split_responses(values_BS: torch.Tensor, batch: PaddedBatch) -> list[torch.Tensor]:
    """Per-sample response values [R] (e.g. log-probs) from per-position values [B, S]."""
    return [values_BS[b, p - 1 : p - 1 + r] for b, (p, r) in enumerate(zip(batch.prompt_lens, batch.response_lens))]


def _tp_group(tp_group):
    from megatron.core import parallel_state as mpu

    return tp_group if tp_group is not None else mpu.get_tensor_model_parallel_group()


def token_logprobs(logits_BSVp: torch.Tensor, targets_BS: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] over the full (TP-sharded) vocabulary -> [B, S] fp32.

    Uses megatron's vocab_parallel_cross_entropy on megatron's TP group. That function
    overwrites its input in place, so it gets a fresh scaled copy; `logits_BSVp` is untouched.
    """
    from megatron.core import tensor_parallel

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled_BSVp = logits_BSVp.float() / temperature  # always a new tensor, even for T == 1
    return -tensor_parallel.vocab_parallel_cross_entropy(scaled_BSVp, targets_BS)


def token_entropy(logits_BSVp: torch.Tensor, temperature: float = 1.0, tp_group=None) -> torch.Tensor:
    """Entropy of softmax(logits / T) over the full (TP-sharded) vocabulary -> [B, S] fp32.

    H = log Σ exp(z - m) - Σ exp(z - m)(z - m) / Σ exp(z - m), with m the global max (no gradient),
    and the two sums all-reduced over the TP group (forward all-reduce, identity backward).
    """
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    group = _tp_group(tp_group)
    z_BSVp = logits_BSVp.float() / temperature
    max_BS = z_BSVp.detach().amax(dim=-1)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(max_BS, op=dist.ReduceOp.MAX, group=group)
    shifted_BSVp = z_BSVp - max_BS.unsqueeze(-1)
    exp_BSVp = shifted_BSVp.exp()
    sum_exp_BS = reduce_from_tensor_model_parallel_region(exp_BSVp.sum(dim=-1), group=group)
    sum_exp_z_BS = reduce_from_tensor_model_parallel_region((exp_BSVp * shifted_BSVp).sum(dim=-1), group=group)
    return sum_exp_BS.log() - sum_exp_z_BS / sum_exp_BS


def response_logprobs_and_entropy(
    logits_BSVp: torch.Tensor, batch: PaddedBatch, temperature: float = 1.0, with_entropy: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-sample response log-probs [R] (and entropies [R]) of one forward's logits."""
    logprobs = split_responses(token_logprobs(logits_BSVp, batch.targets_BS, temperature), batch)
    if not with_entropy:
        return logprobs, None
    return logprobs, split_responses(token_entropy(logits_BSVp, temperature), batch)


def hidden_logprobs_and_entropy(hidden_SBH: torch.Tensor, output_weight_VpH: torch.Tensor, targets_BS: torch.Tensor,
                                temperature: float = 1.0, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(z)[target], entropy of softmax(z)) -> two [B, S] fp32, z = hidden @ weight^T / T.

    `hidden_SBH` are the final hidden states (after the final layernorm, megatron's [S, B, H]
    layout) and `output_weight_VpH` this TP rank's vocabulary rows of the output layer. Runs
    miles.kernels.logprob_entropy (Triton on CUDA, chunked torch on CPU), so no [B, S, Vp] logits
    exist; with TP > 1 the vocabulary partials are all-reduced over the TP group, and the gradient
    of the hidden states is all-reduced too (as the column-parallel output layer's backward does).
    The hidden states are cast to the weight's dtype (exact for bf16 activations that
    Float16Module upcast to fp32).
    """
    from miles.kernels.logprob_entropy import logprob_entropy

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    S, B, H = hidden_SBH.shape
    if tuple(targets_BS.shape) != (B, S):
        raise ValueError(f"targets must be [B, S] = [{B}, {S}] for hidden states [S, B, H] = "
                         f"{tuple(hidden_SBH.shape)}, got {tuple(targets_BS.shape)}")
    group = _tp_group(tp_group)
    sharded = dist.get_world_size(group) > 1
    hidden_NH = hidden_SBH.reshape(S * B, H).to(output_weight_VpH.dtype)  # rows sequence-major, as megatron's
    targets_N = targets_BS.t().reshape(S * B)
    vocab_start = dist.get_rank(group) * output_weight_VpH.shape[0] if sharded else 0
    logprob_N, entropy_N = logprob_entropy(hidden_NH, output_weight_VpH, targets_N, temperature,
                                           vocab_start=vocab_start, group=group if sharded else None)
    return logprob_N.view(S, B).t(), entropy_N.view(S, B).t()


EntropyMode = Literal["none", "detached", "grad"]
"""What a loss needs of the entropy: nothing, its value (logged, no gradient), or its gradient."""


@dataclass(frozen=True, eq=False)
class ForwardOutput:
    """One micro-batch's forward result: the logits (trainer.logprob_impl=full) or the final hidden
    states and the output layer's weight (chunked). Exactly one of the two forms is set."""

    logits_BSVp: torch.Tensor | None = None
    """This TP rank's vocabulary slice of the logits."""
    hidden_SBH: torch.Tensor | None = None
    """The final hidden states, after the final layernorm, in megatron's [S, B, H] layout."""
    output_weight_VpH: torch.Tensor | None = None
    """This TP rank's rows of the output layer (the embedding's when they are tied)."""

    def __post_init__(self):
        if (self.logits_BSVp is None) == (self.hidden_SBH is None or self.output_weight_VpH is None):
            raise ValueError("ForwardOutput needs either logits_BSVp, or hidden_SBH and output_weight_VpH")

    @property
    def device(self) -> torch.device:
        return (self.logits_BSVp if self.logits_BSVp is not None else self.hidden_SBH).device

    def logprobs_and_entropy(self, targets_BS: torch.Tensor, temperature: float = 1.0,
                             entropy: EntropyMode = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, S] fp32 log-probs of `targets_BS` under softmax(logits / T), and the entropy per `entropy`
        (None for "none"; no graph for "detached")."""
        if self.logits_BSVp is None:
            logprob_BS, entropy_BS = hidden_logprobs_and_entropy(self.hidden_SBH, self.output_weight_VpH, targets_BS,
                                                                 temperature)
            return logprob_BS, {"none": None, "detached": entropy_BS.detach(), "grad": entropy_BS}[entropy]
        logprob_BS = token_logprobs(self.logits_BSVp, targets_BS, temperature)
        if entropy == "none":
            return logprob_BS, None
        if entropy == "grad":
            return logprob_BS, token_entropy(self.logits_BSVp, temperature)
        with torch.no_grad():
            return logprob_BS, token_entropy(self.logits_BSVp.detach(), temperature)


# ---------------------------------------------------------------- the model's forward, per logprob_impl

def model_forward(model: torch.nn.Module, batch: PaddedBatch, logprob_impl: str) -> ForwardOutput:
    """One micro-batch through `model` (a GPTModel, possibly inside Float16Module and DDP).

    "full": GPTModel.forward to the end, the [B, S, Vp] logits. "chunked": the final hidden states
    and the output layer's weight (the embedding's when they are tied), never the logits. The
    forward stops after the final layernorm the way megatron's own non-last pipeline stages do:
    GPTModel._postprocess returns the decoder's output when `post_process` is False, and the
    decoder (TransformerBlock) keeps the final layernorm it was built with, so `post_process` is
    set False on the unwrapped GPTModel for this call only (`check_hidden_states_head` checks the
    model once at build time). Safe under the wrappers: DDP's forward only calls its module and
    collects gradients through per-parameter hooks, which fire for the output weight whichever op
    used it; Float16Module upcasts the bf16 hidden states to fp32 on the way out and
    hidden_logprobs_and_entropy casts them back (exact); activation recomputation and R3 replay
    happen inside the decoder. With TP > 1 the kernel all-reduces over the TP group what the
    column-parallel output layer and vocab_parallel_cross_entropy would (logprob_entropy_math.py).
    """
    inputs = (batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS)
    if logprob_impl == "full":
        return ForwardOutput(logits_BSVp=model(*inputs))
    gpt = _unwrap_gpt(model)
    gpt.post_process = False
    try:
        hidden_SBH = model(*inputs)
    finally:
        gpt.post_process = True
    weight_VpH = (gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights
                  else gpt.output_layer.weight)
    return ForwardOutput(hidden_SBH=hidden_SBH, output_weight_VpH=weight_VpH)


def check_hidden_states_head(model: torch.nn.Module) -> None:
    """Raise ConfigError unless `model_forward(..., "chunked")` yields exactly the output layer's input."""
    gpt = _unwrap_gpt(model)
    if (gpt.mtp_process or gpt.config.sequence_parallel or not gpt.post_process
            or gpt.decoder.final_layernorm is None):
        raise ConfigError("trainer.logprob_impl=chunked supports GPT models on their last pipeline stage, without "
                          "multi-token prediction or sequence parallelism (the output layer's input must be the "
                          "final layernorm's whole output); set trainer.logprob_impl=full")


def _unwrap_gpt(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it as `.module`)."""
    from megatron.core.models.gpt import GPTModel

    inner = model
    while not isinstance(inner, GPTModel):
        if not hasattr(inner, "module"):
            raise ConfigError(f"trainer.logprob_impl=chunked needs a megatron GPTModel, found "
                              f"{type(inner).__name__} inside {type(model).__name__}; set trainer.logprob_impl=full")
        inner = inner.module
    return inner
