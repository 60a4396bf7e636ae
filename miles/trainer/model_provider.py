"""Build a megatron-core GPTModel from a Hugging Face config (Qwen3 dense and Qwen3-MoE).

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
"""

import logging
from typing import Any

import torch
import torch.nn.functional as F

from miles.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen3_moe",)


def is_moe(hf_config: Any) -> bool:
    """Whether the HF config is a mixture-of-experts model this provider builds."""
    return getattr(hf_config, "model_type", None) in MOE_MODEL_TYPES


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"rope_type {rope_type!r} is not supported yet (only 'default' RoPE)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ConfigError("HF config has no rope_theta")
    return float(theta)


def _check_moe(hf_config: Any, tp_size: int, ep_size: int) -> None:
    if tp_size != 1:
        raise ConfigError(f"MoE with tensor_model_parallel_size={tp_size} is not supported yet (use EP)")
    experts = hf_config.num_experts
    if experts % ep_size:
        raise ConfigError(f"num_experts={experts} is not divisible by expert_model_parallel_size={ep_size}")
    if list(getattr(hf_config, "mlp_only_layers", None) or []) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
        raise ConfigError("mixed dense/MoE layers (mlp_only_layers, decoder_sparse_step != 1) are not supported yet")
    if getattr(hf_config, "shared_expert_intermediate_size", 0):
        raise ConfigError("shared experts are not supported yet")
    if not 1 <= hf_config.num_experts_per_tok <= experts:
        raise ConfigError(f"num_experts_per_tok={hf_config.num_experts_per_tok} must lie in [1, {experts}]")


def check_hf_config(hf_config: Any, tp_size: int, ep_size: int = 1) -> None:
    """Raise ConfigError if this HF model, TP or EP size cannot be built exactly."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    if getattr(hf_config, "attention_bias", False):
        raise ConfigError("attention_bias=True is not supported yet")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConfigError("sliding-window attention is not supported")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf_config.hidden_act!r} is not supported (SwiGLU needs 'silu')")
    if is_moe(hf_config):
        _check_moe(hf_config, tp_size, ep_size)
    elif ep_size != 1:
        raise ConfigError(f"expert_model_parallel_size={ep_size} needs an MoE model")
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
    """The megatron TransformerConfig equivalent to a Qwen3 / Qwen3-MoE HF config (no pipeline parallelism yet).

    `overrides` are set verbatim on the TransformerConfig (e.g. recompute_granularity="full").
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_hf_config(hf_config, tp_size, ep_size)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"params_dtype {params_dtype} is not supported")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    fields = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
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
    """TransformerConfig fields of a Qwen3-MoE block (see the module docstring)."""
    return dict(
        num_moe_experts=hf_config.num_experts,
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


def gpt_layer_spec(config):
    """megatron's local layer spec with SDPA core attention (dense MLP, or MoE with SequentialMLP)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from miles.trainer.sdpa_attention import SDPACoreAttention

    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm, normalization=config.normalization,
    )
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


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
        rotary_percent=1.0,
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
