"""Per-GPU training memory estimate from a sizing plan: weights, gradients, optimizer, activations.

    counts = count_params(cfg.plan)                       # exact parameter counts of the architecture
    est = estimate_memory(cfg.plan, tp=4, world_size=128, bf16=True)
    print(est.table())

Pure functions of the plan (no checkpoint, no GPU). The estimate is for the heaviest pipeline stage
and is meant to be within ~20% of reality: it answers "does this layout fit", not "how many bytes".

Parameters of one GPU: the stage's layers (ceil(num_layers / PP), MoE layers first counted where the
model has any) plus the embedding and/or output layer; every non-expert tensor is divided by TP
(norms and router included: they are replicated, but tiny), routed experts by EP x ETP.

Bytes per parameter (what MegatronActor does):
  weights    2 (bf16) or 4 (fp32)
  grads      4 (fp32 gradient buffers: grad_reduce_in_fp32)
  optimizer  Adam m + v in fp32 (8), plus the fp32 master copy with bf16 (4); divided by the
             data-parallel size (dense) / expert-data-parallel size (experts) with the
             distributed optimizer.
Activations of one micro-batch of s = tokens_per_microbatch / CP tokens, in the compute dtype
(Korthikanti et al. 2022, flash attention so no s^2 term; SP divides by TP):
  one layer, kept for backward   34 * s * h / TP * (bytes / 2)
  + MoE layer                    s * top_k * (h + 3 * moe_ffn) * bytes / ETP   (dispatched tokens, SwiGLU)
  full recompute                 every layer keeps only its input (s * h * bytes / TP) + one layer's full set
  logits                         s * vocab / TP * 4 bytes * 2 (fp32 logits and their gradient)
"""

import math
from dataclasses import dataclass

from miles.cluster.plan import PlanConfig
from miles.errors import ConfigError

GIB = 1 << 30


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of an architecture, by part."""

    embedding: int
    """Input embedding (vocab x hidden)."""
    output: int
    """Output layer plus the final norm (only the norm when embeddings are tied)."""
    attention: int
    """One layer's attention block, its two norms and the DSA indexer if any."""
    dense_mlp: int
    """One dense SwiGLU MLP."""
    experts: int
    """The routed experts of one MoE layer."""
    shared_and_router: int
    """Shared experts and router of one MoE layer."""
    mtp: int
    """All multi-token-prediction layers."""
    num_dense_layers: int
    """Layers with a dense MLP."""
    num_moe_layers: int
    """Layers with routed experts."""

    @property
    def total(self) -> int:
        """Every parameter of the model."""
        dense = self.num_dense_layers * (self.attention + self.dense_mlp)
        moe = self.num_moe_layers * (self.attention + self.experts + self.shared_and_router)
        return self.embedding + self.output + dense + moe + self.mtp


def _attention_params(p: PlanConfig) -> int:
    h = p.hidden_size
    norms = 2 * h  # input and post-attention RMSNorm
    if p.attention == "gqa":
        q, kv = p.num_attention_heads * p.head_dim, p.num_query_groups * p.head_dim
        return h * q + 2 * h * kv + q * h + 2 * p.head_dim + norms  # q, k, v, o, qk-norms
    qk_dim = p.qk_nope_head_dim + p.qk_rope_head_dim
    heads = p.num_attention_heads
    q = (h * p.q_lora_rank + p.q_lora_rank + p.q_lora_rank * heads * qk_dim) if p.q_lora_rank else h * heads * qk_dim
    kv = h * (p.kv_lora_rank + p.qk_rope_head_dim) + p.kv_lora_rank + p.kv_lora_rank * heads * (p.qk_nope_head_dim + p.v_head_dim)
    out = heads * p.v_head_dim * h
    indexer = 0
    if p.sparse_attention == "dsa":  # DeepSeek-V3.2 lightning indexer: wq_b, wk, k_norm (LayerNorm), weights_proj
        q_in = p.q_lora_rank or h
        indexer = q_in * p.index_n_heads * p.index_head_dim + h * p.index_head_dim + 2 * p.index_head_dim + h * p.index_n_heads
    return q + kv + out + indexer + norms


def count_params(p: PlanConfig) -> ParamCounts:
    """Parameter counts of the planned architecture (SwiGLU MLPs, RMSNorm, no biases)."""
    if not p.declared:
        raise ConfigError("the recipe declares no plan (plan.num_layers = 0); nothing to count")
    h = p.hidden_size
    attention = _attention_params(p)
    experts = p.num_experts * 3 * h * p.moe_ffn_hidden_size
    shared_and_router = p.num_shared_experts * 3 * h * p.moe_ffn_hidden_size + p.num_experts * h
    dense_mlp = 3 * h * p.ffn_hidden_size
    mtp_layer = 2 * h * h + 2 * h + attention + (experts + shared_and_router if p.num_experts else dense_mlp)
    return ParamCounts(
        embedding=p.vocab_size * h, output=(0 if p.tie_embeddings else p.vocab_size * h) + h,
        attention=attention, dense_mlp=dense_mlp, experts=experts, shared_and_router=shared_and_router,
        mtp=p.mtp_num_layers * mtp_layer, num_dense_layers=p.num_layers - p.num_moe_layers,
        num_moe_layers=p.num_moe_layers,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU of the heaviest pipeline stage holds during a train step."""

    params_total: int
    """Parameters of the whole model."""
    params_per_gpu: int
    """Parameters this GPU holds (dense share + expert share)."""
    weights: float
    """Model weights, bytes."""
    grads: float
    """Gradient buffers, bytes."""
    optimizer: float
    """Optimizer state (Adam moments, fp32 master weights), bytes."""
    activations: float
    """Activations of one micro-batch, bytes."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def table(self) -> str:
        """Human-readable lines, GiB with one decimal."""
        rows = [("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
                ("activations", self.activations), ("total", self.total)]
        head = (f"per-GPU memory estimate (heaviest pipeline stage): {self.params_per_gpu / 1e9:.2f} B of "
                f"{self.params_total / 1e9:.2f} B parameters on this GPU")
        return "\n".join([head, *(f"  {name:<12}{value / GIB:8.1f} GiB" for name, value in rows)])


def estimate_memory(p: PlanConfig, tp: int, world_size: int, bf16: bool) -> MemoryEstimate:
    """Per-GPU bytes of the heaviest pipeline stage for plan p at tensor-parallel size tp on world_size GPUs."""
    counts = count_params(p)
    pp, cp, ep, etp = p.pipeline_parallel, p.context_parallel, p.expert_parallel, p.expert_tensor_parallel
    if world_size % (tp * pp * cp) or world_size % (ep * etp * pp):
        raise ConfigError(f"{world_size} trainer GPUs are not divisible by TP x PP x CP = {tp}x{pp}x{cp} "
                          f"and EP x ETP x PP = {ep}x{etp}x{pp}")
    dp, edp = world_size // (tp * pp * cp), world_size // (ep * etp * pp)
    stage_layers = math.ceil(p.num_layers / pp)
    stage_moe = min(stage_layers, counts.num_moe_layers)
    stage_dense = stage_layers - stage_moe
    ends = counts.embedding + counts.output if pp == 1 else max(counts.embedding, counts.output)
    dense_params = (ends + stage_layers * counts.attention + stage_dense * counts.dense_mlp
                    + stage_moe * counts.shared_and_router) / tp
    expert_params = stage_moe * counts.experts / (ep * etp)
    params = dense_params + expert_params

    act_bytes = 2 if bf16 else 4
    opt_per_param = 12 if bf16 else 8
    opt_params = dense_params / dp + expert_params / edp if p.distributed_optimizer else params
    s, h = p.tokens_per_microbatch / cp, p.hidden_size
    sp = tp if p.sequence_parallel else 1
    layer_full = 34 * s * h / sp * act_bytes / 2
    moe_extra = s * p.moe_top_k * (h + 3 * p.moe_ffn_hidden_size) * act_bytes / etp if stage_moe else 0.0
    if p.recompute == "full":
        layers = stage_layers * s * h * act_bytes / sp + layer_full + moe_extra
    else:
        layers = stage_layers * layer_full + stage_moe * moe_extra
    logits = s * p.vocab_size / tp * 4 * 2
    return MemoryEstimate(
        params_total=counts.total, params_per_gpu=round(params), weights=params * act_bytes, grads=params * 4,
        optimizer=opt_params * opt_per_param, activations=layers + logits,
    )
