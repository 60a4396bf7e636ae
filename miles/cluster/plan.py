"""The sizing plan of a large run (recipe section `plan`) and the check of what Miles can run today.

A recipe such as `configs/glm5.yaml` declares the model's published architecture and the parallel
layout it is sized for, so that `miles-submit --dry-run` can render the job and estimate per-GPU
memory without the checkpoint (`miles.cluster.memory`). `unsupported_features(cfg)` names every
piece of the plan that our model provider or trainer lacks; a real run (Slurm or local) stops on it
before anything is allocated, while a dry run still works.

An empty plan (num_layers = 0, the default) declares nothing: no estimate, no feature check.
"""

from dataclasses import dataclass

from miles.errors import ConfigError

ATTENTIONS = ("gqa", "mla")
SPARSE_ATTENTIONS = ("none", "dsa")
RECOMPUTE = ("none", "full")
SUPPORTED_ARCHITECTURES = ("qwen3", "qwen3_moe")
"""HF model types `miles.trainer.model_provider` builds."""


@dataclass(frozen=True)
class PlanConfig:
    """Published architecture + planned parallel layout, for the dry-run estimate and the support check."""

    architecture: str = ""
    """HF model_type of the checkpoint, e.g. "qwen3", "qwen3_moe", "glm_moe_dsa"."""
    num_layers: int = 0
    """Transformer layers (0 = no plan declared)."""
    num_dense_layers: int = 0
    """Leading layers with a dense MLP in an MoE model (the rest are MoE); all layers are dense when num_experts is 0."""
    hidden_size: int = 0
    """Model width."""
    ffn_hidden_size: int = 0
    """Intermediate size of the dense (SwiGLU) MLP."""
    num_attention_heads: int = 0
    """Query heads."""
    num_query_groups: int = 0
    """Key/value heads of GQA (equal to num_attention_heads for MHA; unused by MLA)."""
    head_dim: int = 0
    """Per-head dimension of GQA attention."""
    attention: str = "gqa"
    """Attention kind: "gqa" or "mla" (multi-head latent attention, DeepSeek-V3 style)."""
    q_lora_rank: int = 0
    """MLA: rank of the query down-projection."""
    kv_lora_rank: int = 0
    """MLA: rank of the key/value down-projection."""
    qk_nope_head_dim: int = 0
    """MLA: per-head query/key dimension without RoPE."""
    qk_rope_head_dim: int = 0
    """MLA: per-head query/key dimension with RoPE."""
    v_head_dim: int = 0
    """MLA: per-head value dimension."""
    sparse_attention: str = "none"
    """"dsa" = DeepSeek sparse attention (a lightning indexer picks index_topk keys per query)."""
    index_n_heads: int = 0
    """DSA: indexer heads."""
    index_head_dim: int = 0
    """DSA: indexer head dimension."""
    index_topk: int = 0
    """DSA: keys each query attends to."""
    num_experts: int = 0
    """Routed experts per MoE layer (0 = a dense model)."""
    moe_top_k: int = 0
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int = 0
    """Intermediate size of one expert (SwiGLU)."""
    num_shared_experts: int = 0
    """Shared experts per MoE layer (each of moe_ffn_hidden_size)."""
    vocab_size: int = 0
    """Vocabulary size (embedding and output layer rows)."""
    tie_embeddings: bool = False
    """Whether the output layer shares the input embedding's weights."""
    mtp_num_layers: int = 0
    """Multi-token-prediction layers trained with the model (0 = none)."""
    pipeline_parallel: int = 1
    """Planned Megatron pipeline-parallel size (the trainer's TP size is trainer.tensor_model_parallel_size)."""
    context_parallel: int = 1
    """Planned context-parallel size (the sequence split across GPUs)."""
    expert_parallel: int = 1
    """Planned expert-parallel size."""
    expert_tensor_parallel: int = 1
    """Planned tensor-parallel size inside each expert."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism (shards the activations between TP ranks)."""
    recompute: str = "full"
    """Activation recomputation: "full" (keep each layer's input only) or "none"."""
    distributed_optimizer: bool = True
    """Shard the optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    tokens_per_microbatch: int = 0
    """Tokens of one packed micro-batch before the context-parallel split (Miles' max-tokens-per-gpu x CP)."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"plan.attention={self.attention!r} is not one of {ATTENTIONS}")
        if self.sparse_attention not in SPARSE_ATTENTIONS:
            raise ConfigError(f"plan.sparse_attention={self.sparse_attention!r} is not one of {SPARSE_ATTENTIONS}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"plan.recompute={self.recompute!r} is not one of {RECOMPUTE}")
        for name in ("pipeline_parallel", "context_parallel", "expert_parallel", "expert_tensor_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"plan.{name} must be >= 1, got {getattr(self, name)}")
        if not self.declared:
            return
        required = ["hidden_size", "num_attention_heads", "vocab_size", "tokens_per_microbatch"]
        required += ["ffn_hidden_size"] if self.num_dense_layers or not self.num_experts else []
        required += ["num_query_groups", "head_dim"] if self.attention == "gqa" else [
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        required += ["moe_top_k", "moe_ffn_hidden_size"] if self.num_experts else []
        required += ["index_n_heads", "index_head_dim", "index_topk"] if self.sparse_attention == "dsa" else []
        missing = [name for name in required if getattr(self, name) <= 0]
        if missing:
            raise ConfigError(f"plan declares {self.num_layers} layers but lacks {', '.join('plan.' + m for m in missing)}")
        if self.num_dense_layers > self.num_layers:
            raise ConfigError(f"plan.num_dense_layers={self.num_dense_layers} exceeds plan.num_layers={self.num_layers}")
        if self.num_experts and self.num_experts % self.expert_parallel:
            raise ConfigError(f"plan.num_experts={self.num_experts} is not divisible by plan.expert_parallel={self.expert_parallel}")

    @property
    def declared(self) -> bool:
        """Whether the recipe declares a plan at all."""
        return self.num_layers > 0

    @property
    def num_moe_layers(self) -> int:
        """Layers with routed experts."""
        return self.num_layers - self.num_dense_layers if self.num_experts else 0


def unsupported_features(cfg) -> list[str]:
    """What in cfg (a RunConfig) our trainer cannot run yet, one line per missing piece; [] = runnable."""
    plan: PlanConfig = cfg.plan
    if not plan.declared:
        return []
    provider = "miles.trainer.model_provider (Qwen3 dense/MoE layer specs only)"
    missing = []
    if plan.architecture not in SUPPORTED_ARCHITECTURES:
        missing.append(f"model architecture {plan.architecture!r}: {provider} builds {', '.join(SUPPORTED_ARCHITECTURES)}")
    if plan.attention == "mla":
        missing.append(f"MLA (multi-head latent attention): megatron-core has it, {provider} does not build it")
    if plan.sparse_attention == "dsa":
        missing.append(f"DSA sparse attention (lightning indexer, top-{plan.index_topk} keys): megatron-core 0.16 has "
                       f"it as an experimental attention variant, {provider} does not build it")
    if plan.mtp_num_layers:
        missing.append(f"MTP (plan.mtp_num_layers={plan.mtp_num_layers}): {provider} builds no multi-token-prediction head")
    for key, what in (("pipeline_parallel", "pipeline"), ("context_parallel", "context"),
                      ("expert_parallel", "expert")):
        if getattr(plan, key) > 1:
            missing.append(f"{what} parallelism (plan.{key}={getattr(plan, key)}): MegatronActor runs "
                           f"{what}-parallel size 1 only")
    if plan.expert_tensor_parallel > 1:
        missing.append(f"expert tensor parallelism (plan.expert_tensor_parallel={plan.expert_tensor_parallel}): "
                       f"MegatronActor runs size 1 only")
    return missing
