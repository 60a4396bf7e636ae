"""Build a megatron-core GPTModel from a Hugging Face config (Qwen3 dense, Qwen3-MoE, GLM-4.5 MoE).

The model uses megatron's local layer spec (no Transformer Engine) with `SDPACoreAttention` on
both CPU and GPU, and exactly the HF vocabulary (no padding: vocab_size must divide by TP).
Parameters are created on the CPU (`use_cpu_initialization=True`, so initial weights do not
depend on TP) and moved to the current GPU when CUDA is available. Call after
`miles.trainer.parallel.init_parallel`.

MoE (Qwen3-MoE): every layer is an MoE layer with a softmax top-k router (HF `norm_topk_prob`
= megatron's softmax over the top-k logits; without it, softmax over all experts then top-k),
SequentialMLP experts (no grouped GEMM), the allgather dispatcher, no aux loss, routing replay
enabled (idle until R3 uses it: miles/routing/replay.py), no shared expert
(Qwen3-MoE has none; a config with `shared_expert_intermediate_size` is refused for now).
Experts are split over expert-parallel ranks (`ep_size`); MoE with TP > 1 is refused for now
(megatron needs sequence parallelism there, and expert TP layouts are not converted yet).

GLM-4.5 / DeepSeek-V3-style MoE (HF `glm4_moe`), same experts and dispatcher, and:
- the first `first_k_dense_replace` layers have a dense MLP (`moe_layer_freq` list);
- sigmoid router scores; the top-k is chosen on score + `e_score_correction_bias` (megatron's
  `expert_bias` buffer, loaded from HF), the gating weights are the unbiased scores of the chosen
  experts, renormalised, times `routed_scaling_factor` (`moe_router_topk_scaling_factor`). Megatron
  always renormalises a sigmoid top-k > 1 and never a top-1, so `norm_topk_prob` must equal
  top_k > 1. Group-limited routing (`n_group` > 1) ranks groups by the sum of their top
  `top_k // topk_group` scores in megatron and their top 2 in HF: refused unless that is 2;
- the expert bias is fixed: megatron would move it by `moe_router_bias_update_rate` after every
  optimizer step from the step's expert loads (aux-loss-free balancing); RL keeps the checkpoint's
  bias (rate 0), so the engine, which loaded the same bias, routes with the same one;
- `n_shared_experts` shared experts as one ungated MLP of `moe_intermediate_size * n_shared_experts`;
- partial RoPE (`partial_rotary_factor` = megatron's `rotary_percent`), optional q/k RMSNorm
  (`use_qk_norm`) and q/k/v bias (`attention_bias`; megatron's `add_qkv_bias`, o_proj has none);
- the router runs in fp32 (`moe_router_dtype`), as HF keeps the gate in fp32;
- MTP layers (`num_nextn_predict_layers`) are not built: their checkpoint weights are ignored.
`hf_architecture` is the one reader of these HF fields for the provider, the weight converter
and R3.
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from miles.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "glm4_moe")
MOE_MODEL_TYPES = ("qwen3_moe", "glm4_moe")


def is_moe(hf_config: Any) -> bool:
    """Whether the HF config is a mixture-of-experts model this provider builds."""
    return getattr(hf_config, "model_type", None) in MOE_MODEL_TYPES


@dataclass(frozen=True)
class HFArchitecture:
    """The layout of an HF model that the provider, the weight converter and R3 share."""

    num_layers: int
    """Decoder layers (num_hidden_layers; MTP layers excluded)."""
    moe_layers: tuple[int, ...]
    """Indices of the layers with an MoE block (empty for a dense model); the rest are dense."""
    num_experts: int
    """Routed experts per MoE layer (0 for a dense model)."""
    top_k: int
    """Experts per token (0 for a dense model)."""
    qk_norm: bool
    """RMSNorm on each query and key head."""
    qkv_bias: bool
    """q/k/v projections have a bias (o_proj has none)."""
    shared_expert_size: int
    """Intermediate size of the shared-expert MLP of each MoE layer (0: none)."""
    expert_bias: bool
    """Sigmoid router with a per-expert selection bias (HF e_score_correction_bias)."""


def hf_architecture(hf_config: Any) -> HFArchitecture:
    """Read the layout from a supported HF config (call check_hf_config first for the limits)."""
    model_type = getattr(hf_config, "model_type", None)
    layers = hf_config.num_hidden_layers
    if model_type == "glm4_moe":
        return HFArchitecture(
            num_layers=layers, moe_layers=tuple(range(hf_config.first_k_dense_replace, layers)),
            num_experts=hf_config.n_routed_experts, top_k=hf_config.num_experts_per_tok,
            qk_norm=bool(hf_config.use_qk_norm), qkv_bias=bool(hf_config.attention_bias),
            shared_expert_size=hf_config.moe_intermediate_size * (hf_config.n_shared_experts or 0), expert_bias=True)
    moe = model_type == "qwen3_moe"
    return HFArchitecture(
        num_layers=layers, moe_layers=tuple(range(layers)) if moe else (),
        num_experts=hf_config.num_experts if moe else 0, top_k=hf_config.num_experts_per_tok if moe else 0,
        qk_norm=True, qkv_bias=False, shared_expert_size=0, expert_bias=False)


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"rope_type {rope_type!r} is not supported yet (only 'default' RoPE)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ConfigError("HF config has no rope_theta")
    return float(theta)


def _rotary_percent(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    factor = float(params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0))
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    rotary_dim = int(head_dim * factor)
    if not 0 < factor <= 1 or rotary_dim % 2 or rotary_dim / head_dim != factor:
        raise ConfigError(f"partial_rotary_factor={factor} must give an even number of rotary dims of "
                          f"head_dim={head_dim} exactly")
    return factor


def _check_moe(hf_config: Any, tp_size: int, ep_size: int) -> None:
    if tp_size != 1:
        raise ConfigError(f"MoE with tensor_model_parallel_size={tp_size} is not supported yet (use EP)")
    experts = hf_architecture(hf_config).num_experts
    if experts % ep_size:
        raise ConfigError(f"num_experts={experts} is not divisible by expert_model_parallel_size={ep_size}")
    if list(getattr(hf_config, "mlp_only_layers", None) or []) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
        raise ConfigError("mixed dense/MoE layers (mlp_only_layers, decoder_sparse_step != 1) are not supported yet")
    if getattr(hf_config, "shared_expert_intermediate_size", 0):
        raise ConfigError("shared experts are not supported yet")
    if not 1 <= hf_config.num_experts_per_tok <= experts:
        raise ConfigError(f"num_experts_per_tok={hf_config.num_experts_per_tok} must lie in [1, {experts}]")
    if hf_config.model_type == "glm4_moe":
        _check_glm4_router(hf_config)


def _check_glm4_router(hf_config: Any) -> None:
    """The glm4_moe routing that megatron's sigmoid router computes exactly (see the module docstring)."""
    top_k, experts = hf_config.num_experts_per_tok, hf_config.n_routed_experts
    layers, dense = hf_config.num_hidden_layers, hf_config.first_k_dense_replace
    if not 0 <= dense < layers:
        raise ConfigError(f"first_k_dense_replace={dense} must lie in [0, num_hidden_layers={layers}) "
                          "(a model without MoE layers is not a glm4_moe model)")
    if bool(hf_config.norm_topk_prob) != (top_k > 1):
        raise ConfigError(f"norm_topk_prob={hf_config.norm_topk_prob} with num_experts_per_tok={top_k} cannot be "
                          "expressed: megatron's sigmoid router renormalises the top-k weights exactly when top_k > 1")
    if not (hf_config.n_shared_experts or 0) >= 1:
        raise ConfigError(f"n_shared_experts={hf_config.n_shared_experts}: glm4_moe without shared experts is not "
                          "supported (HF builds a zero-width shared MLP)")
    groups, topk_group = hf_config.n_group, hf_config.topk_group
    if groups < 1 or experts % groups or not 1 <= topk_group <= groups:
        raise ConfigError(f"n_group={groups}, topk_group={topk_group} do not split n_routed_experts={experts}")
    if 1 < groups != topk_group:
        if experts // groups < 2 or top_k // topk_group != 2:
            raise ConfigError(f"group-limited routing with n_group={groups}, topk_group={topk_group}, "
                              f"num_experts_per_tok={top_k}: HF ranks groups by their top-2 scores, megatron by "
                              f"their top num_experts_per_tok // topk_group = {top_k // topk_group}; only 2 is exact")
        if top_k > topk_group * (experts // groups):
            raise ConfigError(f"num_experts_per_tok={top_k} exceeds the {topk_group} selected groups' experts")


def check_hf_config(hf_config: Any, tp_size: int, ep_size: int = 1) -> None:
    """Raise ConfigError if this HF model, TP or EP size cannot be built exactly."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    if getattr(hf_config, "attention_bias", False) and model_type != "glm4_moe":
        raise ConfigError("attention_bias=True is not supported yet (megatron's add_qkv_bias has no o_proj bias)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConfigError("sliding-window attention is not supported")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf_config.hidden_act!r} is not supported (SwiGLU needs 'silu')")
    if is_moe(hf_config):
        _check_moe(hf_config, tp_size, ep_size)
    elif ep_size != 1:
        raise ConfigError(f"expert_model_parallel_size={ep_size} needs an MoE model")
    _rotary_percent(hf_config)
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    for what, value in (("num_attention_heads", heads), ("num_key_value_heads", groups),
                        ("vocab_size", hf_config.vocab_size), ("intermediate_size", hf_config.intermediate_size)):
        if value % tp_size:
            raise ConfigError(f"{what}={value} is not divisible by tensor_model_parallel_size={tp_size}")
    if heads % groups:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")


def transformer_config_from_hf(
    hf_config: Any,
    tp_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
    ep_size: int = 1,
    **overrides: Any,
):
    """The megatron TransformerConfig equivalent to a Qwen3 / Qwen3-MoE / GLM-4.5-MoE HF config (no pipelining yet).

    `overrides` are set verbatim on the TransformerConfig (e.g. recompute_granularity="full").
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_hf_config(hf_config, tp_size, ep_size)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"params_dtype {params_dtype} is not supported")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    arch = hf_architecture(hf_config)
    fields = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=True,
        perform_initialization=init_weights,
        # Fused kernels need CUDA extensions; the unfused paths are exact and run everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        attention_softmax_in_fp32=True,
    )
    if is_moe(hf_config):
        fields.update(_moe_fields(hf_config, ep_size))
    fields.update(overrides)
    return TransformerConfig(**fields)


def _moe_fields(hf_config: Any, ep_size: int) -> dict[str, Any]:
    """TransformerConfig fields of a Qwen3-MoE or GLM-4.5 MoE block (see the module docstring)."""
    arch = hf_architecture(hf_config)
    fields = dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not bool(getattr(hf_config, "norm_topk_prob", False)),
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ep_size,
        # R3: every router gets a RouterReplay (idle unless miles.routing.replay switches it on).
        moe_enable_routing_replay=True,
    )
    if hf_config.model_type == "glm4_moe":
        groups = hf_config.n_group if 1 < hf_config.n_group != hf_config.topk_group else None
        fields.update(
            moe_router_score_function="sigmoid",
            moe_router_pre_softmax=False,
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=0.0,  # the checkpoint's bias stays fixed (module docstring)
            moe_router_topk_scaling_factor=float(hf_config.routed_scaling_factor),
            moe_router_num_groups=groups,
            moe_router_group_topk=hf_config.topk_group if groups else None,
            moe_router_dtype="fp32",
            moe_shared_expert_intermediate_size=arch.shared_expert_size,
            moe_shared_expert_gate=False,
            moe_shared_expert_overlap=False,
            moe_layer_freq=[int(i in arch.moe_layers) for i in range(arch.num_layers)],
        )
    return fields


def gpt_layer_spec(config):
    """megatron's local layer spec with SDPA core attention (dense MLP, or MoE with SequentialMLP).

    With a `moe_layer_freq` list (dense and MoE layers mixed), a block spec of one layer spec each.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules

    from miles.trainer.sdpa_attention import SDPACoreAttention

    def local_spec(num_experts):
        spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                        qk_layernorm=config.qk_layernorm, normalization=config.normalization)
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
        return spec

    if not isinstance(config.moe_layer_freq, list):
        return local_spec(config.num_moe_experts)
    dense, moe = local_spec(None), local_spec(config.num_moe_experts)
    return TransformerBlockSubmodules(layer_specs=[moe if f else dense for f in config.moe_layer_freq],
                                      layer_norm=LayerNormImpl)


def _bind_missing_te_gemm() -> None:
    """megatron-core 0.16.1's MoE router GEMM reads `moe_utils.te_general_gemm`, a name bound only when
    Transformer Engine imports (NameError in every MoE forward without TE, on GPU as on CPU, where
    cpu_compat's S4 does the same). None selects its plain torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(
    hf_config: Any,
    tp_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
    **overrides: Any,
):
    """A GPTModel (this rank's TP shards, vocab-parallel output) matching the HF architecture.

    Returns the bare model; the trainer wraps it (Float16Module for bf16, megatron DDP).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    ep_size = mpu.get_expert_model_parallel_world_size() if is_moe(hf_config) else 1
    if is_moe(hf_config):
        _bind_missing_te_gemm()
    config = transformer_config_from_hf(hf_config, tp_size, params_dtype, init_weights=init_weights, ep_size=ep_size,
                                        **overrides)
    if mpu.get_tensor_model_parallel_world_size() != tp_size:
        raise ConfigError(f"tp_size={tp_size} but megatron was initialized with "
                          f"TP={mpu.get_tensor_model_parallel_world_size()}")
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(config),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=_rotary_percent(hf_config),
        rotary_base=_rope_theta(hf_config),
    )
    if config.moe_enable_routing_replay:
        # megatron also lists every RouterReplay in a process-wide static list; miles.routing.replay
        # finds a model's own routers instead, so drop the list rather than let it grow per model.
        from megatron.core.transformer.moe.router_replay import RouterReplay

        RouterReplay.clear_global_router_replay_instances()
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    logger.info("built GPTModel: %d params on this rank", sum(p.numel() for p in model.parameters()))
    return model
