"""Exact HF <-> Megatron weight conversion for Qwen3 dense, Qwen3-MoE and GLM-4.5 MoE, with TP and EP shards.

Megatron layout (local layer spec, see model_provider), per TP rank r of T:

- `linear_qkv.weight` [G/T * (Q/G + 2) * D, hidden]: for each query group of this rank, its Q/G
  query heads, then its key head, then its value head (D rows each). Groups are contiguous, so
  rank r holds groups [r*G/T, (r+1)*G/T).
- `linear_fc1.weight` [2 * I/T, hidden]: [gate rows of rank r; up rows of rank r].
- `linear_proj` / `linear_fc2` (row parallel): columns of rank r.
- `word_embeddings` / `output_layer` (vocab parallel): vocab rows of rank r.
- norms (input, pre-MLP, q/k, final): replicated.
- MoE layers (TP = 1): `mlp.router.weight` [E, hidden] = HF `mlp.gate.weight` (replicated);
  `mlp.experts.local_experts.j.linear_fc1.weight` = [gate; up] and `.linear_fc2.weight` = down of
  global expert `ep_rank * E/EP + j` (HF `mlp.experts.<g>.{gate,up,down}_proj.weight`): each EP
  rank holds a contiguous block of experts, and `megatron_to_hf` on it yields only those.
- glm4_moe (model_provider's `hf_architecture`): the first `first_k_dense_replace` layers are dense
  (`mlp.linear_fc1/fc2` = HF `mlp.{gate,up,down}_proj`); MoE layers add
  `mlp.shared_experts.linear_fc1` = [gate; up] / `linear_fc2` = down of HF `mlp.shared_experts.*`
  (replicated over EP) and the router's `expert_bias` buffer = HF `mlp.gate.e_score_correction_bias`
  (fp32, replicated; not trained: model_provider sets its update rate to 0). `use_qk_norm=False` drops
  the q/k norms; `attention_bias` adds `linear_qkv.bias`, fused per query group like the weight.

Every transform is a slice, concatenation or reshape, so HF -> Megatron -> HF is bit-exact.
`megatron_to_hf` is what weight sync streams: it all-gathers TP shards of each parameter (in
model order, so every TP rank must iterate the same parameters) and yields full HF tensors.
"""

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from miles.errors import ConfigError

# gather(megatron_name, local_shard) -> the shards of all TP ranks, in TP-rank order.
Gather = Callable[[str, torch.Tensor], list[torch.Tensor]]

# Kinds of tensor-parallel layout.
_REPLICATED, _COLUMN, _ROW, _QKV, _GATE_UP = "replicated", "column", "row", "qkv", "gate_up"

_GLOBAL_RULES = {
    "embedding.word_embeddings.weight": (_COLUMN, ("model.embed_tokens.weight",)),
    "output_layer.weight": (_COLUMN, ("lm_head.weight",)),
    "decoder.final_layernorm.weight": (_REPLICATED, ("model.norm.weight",)),
}
_ATTENTION_RULES = {  # megatron suffix -> (kind, HF suffixes), both under the layer prefix
    "input_layernorm.weight": (_REPLICATED, ("input_layernorm.weight",)),
    "pre_mlp_layernorm.weight": (_REPLICATED, ("post_attention_layernorm.weight",)),
    "self_attention.q_layernorm.weight": (_REPLICATED, ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": (_REPLICATED, ("self_attn.k_norm.weight",)),
    "self_attention.linear_qkv.weight": (_QKV, ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                "self_attn.v_proj.weight")),
    "self_attention.linear_proj.weight": (_ROW, ("self_attn.o_proj.weight",)),
}
_QK_NORM = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
_QKV_BIAS_RULE = {"self_attention.linear_qkv.bias": (_QKV, ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                            "self_attn.v_proj.bias"))}
_DENSE_MLP_RULES = {
    "mlp.linear_fc1.weight": (_GATE_UP, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": (_ROW, ("mlp.down_proj.weight",)),
}
_ROUTER_RULES = {"mlp.router.weight": (_REPLICATED, ("mlp.gate.weight",))}
# A buffer in megatron (TopKRouter.expert_bias, fp32), not a parameter: see `named_weights`.
_EXPERT_BIAS_RULES = {"mlp.router.expert_bias": (_REPLICATED, ("mlp.gate.e_score_correction_bias",))}
_SHARED_EXPERT_RULES = {  # replicated over EP ranks, like the attention
    "mlp.shared_experts.linear_fc1.weight": (_GATE_UP, ("mlp.shared_experts.gate_proj.weight",
                                                        "mlp.shared_experts.up_proj.weight")),
    "mlp.shared_experts.linear_fc2.weight": (_ROW, ("mlp.shared_experts.down_proj.weight",)),
}
_EXPERT_RULES = {  # local expert suffix -> (kind, HF suffixes under mlp.experts.<global expert>.)
    "linear_fc1.weight": (_GATE_UP, ("gate_proj.weight", "up_proj.weight")),
    "linear_fc2.weight": (_ROW, ("down_proj.weight",)),
}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_NAME = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _tied(hf_config: Any) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


def _head_dim(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _arch(hf_config: Any):
    from miles.trainer.model_provider import hf_architecture

    return hf_architecture(hf_config)


def _layer_rules(arch, layer: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Megatron suffix -> (kind, HF suffixes) of decoder layer `layer`, its routed experts excluded."""
    rules = {k: v for k, v in _ATTENTION_RULES.items() if arch.qk_norm or k not in _QK_NORM}
    if arch.qkv_bias:
        rules.update(_QKV_BIAS_RULE)
    if layer not in arch.moe_layers:
        return {**rules, **_DENSE_MLP_RULES}
    rules.update(_ROUTER_RULES)
    if arch.expert_bias:
        rules.update(_EXPERT_BIAS_RULES)
    if arch.shared_expert_size:
        rules.update(_SHARED_EXPERT_RULES)
    return rules


def _rule(megatron_name: str, hf_config: Any, ep_rank: int = 0, ep_size: int = 1) -> tuple[str, tuple[str, ...]]:
    """(kind, HF names) of one Megatron tensor name (local experts of EP rank `ep_rank`)."""
    if megatron_name in _GLOBAL_RULES:
        return _GLOBAL_RULES[megatron_name]
    match = _LAYER_NAME.match(megatron_name)
    arch = _arch(hf_config)
    layer = int(match.group(1)) if match is not None else -1
    rules = _layer_rules(arch, layer) if 0 <= layer < arch.num_layers else {}
    if match is not None and match.group(2) in rules:
        kind, suffixes = rules[match.group(2)]
        return kind, tuple(f"model.layers.{layer}.{s}" for s in suffixes)
    expert = _EXPERT_NAME.match(match.group(2)) if match is not None and layer in arch.moe_layers else None
    local_experts = arch.num_experts // ep_size
    if expert is None or expert.group(2) not in _EXPERT_RULES or int(expert.group(1)) >= local_experts:
        raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r}")
    kind, suffixes = _EXPERT_RULES[expert.group(2)]
    global_expert = ep_rank * local_experts + int(expert.group(1))
    return kind, tuple(f"model.layers.{layer}.mlp.experts.{global_expert}.{s}" for s in suffixes)


def megatron_names(hf_config: Any, ep_size: int = 1) -> list[str]:
    """All Megatron tensor names of the model on one rank (local expert names), in a fixed order.

    The parameters, plus each MoE layer's `mlp.router.expert_bias` buffer for a model with an
    expert bias (glm4_moe).
    """
    arch = _arch(hf_config)
    names = ["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        names += [f"decoder.layers.{i}.{suffix}" for suffix in _layer_rules(arch, i)]
        if i in arch.moe_layers:
            for j in range(arch.num_experts // ep_size):
                names += [f"decoder.layers.{i}.mlp.experts.local_experts.{j}.{suffix}" for suffix in _EXPERT_RULES]
    names.append("decoder.final_layernorm.weight")
    if not _tied(hf_config):
        names.append("output_layer.weight")
    return names


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config: Any) -> torch.Tensor:
    """HF q/k/v [heads*D, hidden] (or biases [heads*D]) -> Megatron grouped [G*(Q/G+2)*D, ...]."""
    groups, d = hf_config.num_key_value_heads, _head_dim(hf_config)
    q_per_group = hf_config.num_attention_heads // groups
    rest = tuple(q.shape[1:])
    fused = torch.cat([q.reshape(groups, q_per_group * d, *rest), k.reshape(groups, d, *rest),
                       v.reshape(groups, d, *rest)], dim=1)
    return fused.reshape(-1, *rest)


def _split_qkv(fused: torch.Tensor, hf_config: Any) -> tuple[torch.Tensor, ...]:
    """Inverse of `_fuse_qkv` on the full (all TP ranks) tensor."""
    groups, d = hf_config.num_key_value_heads, _head_dim(hf_config)
    q_per_group = hf_config.num_attention_heads // groups
    rest = tuple(fused.shape[1:])
    grouped = fused.reshape(groups, (q_per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [q_per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _shard(kind: str, hf_tensors: list[torch.Tensor], hf_config: Any, tp_rank: int, tp_size: int) -> torch.Tensor:
    if kind == _REPLICATED:
        return hf_tensors[0]
    if kind == _COLUMN:
        return hf_tensors[0].chunk(tp_size, dim=0)[tp_rank]
    if kind == _ROW:
        return hf_tensors[0].chunk(tp_size, dim=1)[tp_rank]
    if kind == _QKV:
        return _fuse_qkv(*hf_tensors, hf_config).chunk(tp_size, dim=0)[tp_rank]
    assert kind == _GATE_UP, kind
    gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in hf_tensors)
    return torch.cat([gate, up], dim=0)


def _merge(kind: str, shards: list[torch.Tensor], hf_config: Any) -> tuple[torch.Tensor, ...]:
    if kind == _REPLICATED:
        return (shards[0],)
    if kind == _COLUMN:
        return (torch.cat(shards, dim=0),)
    if kind == _ROW:
        return (torch.cat(shards, dim=1),)
    if kind == _QKV:
        return _split_qkv(torch.cat(shards, dim=0), hf_config)
    assert kind == _GATE_UP, kind
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)


def hf_to_megatron(
    hf_state_dict: dict[str, torch.Tensor], hf_config: Any, tp_rank: int = 0, tp_size: int = 1,
    ep_rank: int = 0, ep_size: int = 1,
) -> dict[str, torch.Tensor]:
    """This TP/EP rank's Megatron shards (contiguous copies) of an HF state dict.

    Raises ConfigError if the HF state dict lacks a weight or has one this converter ignores
    (the experts of other EP ranks count as used). glm4_moe checkpoints may carry MTP layers
    (`model.layers.<i>` with i >= num_hidden_layers, for speculative decoding): the trainer does
    not build them, so they are skipped (neither trained nor exported).
    """
    from miles.trainer.model_provider import check_hf_config

    check_hf_config(hf_config, tp_size, ep_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank {ep_rank} is outside [0, {ep_size})")
    names = megatron_names(hf_config, ep_size)
    used = {n for r in range(ep_size) for name in names for n in _rule(name, hf_config, r, ep_size)[1]}
    out = {}
    for name in names:
        kind, hf_names = _rule(name, hf_config, ep_rank, ep_size)
        missing = [n for n in hf_names if n not in hf_state_dict]
        if missing:
            raise ConfigError(f"HF checkpoint lacks {missing} (needed for Megatron {name})")
        tensors = [hf_state_dict[n] for n in hf_names]
        out[name] = _shard(kind, tensors, hf_config, tp_rank, tp_size).contiguous().clone()
    ignored = set(hf_state_dict) - used
    if getattr(hf_config, "model_type", None) == "glm4_moe":
        mtp = {n for n in ignored if (m := _HF_LAYER.match(n)) and int(m.group(1)) >= hf_config.num_hidden_layers}
        ignored -= mtp
    if _tied(hf_config):
        ignored.discard("lm_head.weight")  # some tied checkpoints still store the alias
    if ignored:
        raise ConfigError(f"HF checkpoint has weights with no Megatron mapping: {sorted(ignored)[:8]}")
    return out


def _strip_wrappers(name: str) -> str:
    """Drop the `module.` prefixes that DDP / Float16Module wrappers add."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def megatron_to_hf(
    named_params: Iterable[tuple[str, torch.Tensor]], hf_config: Any, tp_size: int = 1, gather: Gather | None = None,
    ep_rank: int = 0, ep_size: int = 1,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for each Megatron (name, local shard), gathering TP shards.

    With EP, local experts are named by their global index (`ep_rank`'s block): the caller
    collects the other EP ranks' experts (each rank yields only its own).

    Pass `named_weights(model)` rather than `model.named_parameters()` to export the expert
    bias too (glm4_moe's `e_score_correction_bias`; fixed in training, see model_provider).

    `gather` is called only for TP-sharded parameters and must return the shards of all TP ranks
    in rank order (`tp_all_gather()` for real ranks). Every TP rank must iterate the same names
    in the same order, since the gather is a collective. Replicated tensors (norms) are yielded
    as detached views of the parameters: copy them before modifying.
    """
    if tp_size > 1 and gather is None:
        raise ValueError("megatron_to_hf with tp_size > 1 needs a gather function")
    for raw_name, tensor in named_params:
        name = _strip_wrappers(raw_name)
        kind, hf_names = _rule(name, hf_config, ep_rank, ep_size)
        tensor = tensor.detach()
        shards = gather(name, tensor) if tp_size > 1 and kind != _REPLICATED else [tensor]
        assert len(shards) == (1 if kind == _REPLICATED else tp_size), (name, len(shards))
        yield from zip(hf_names, _merge(kind, shards, hf_config))


def tp_all_gather(group=None) -> Gather:
    """A `Gather` that all-gathers over megatron's TP group (or `group`)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    def gather(name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        tp_group = group if group is not None else mpu.get_tensor_model_parallel_group()
        tensor = tensor.contiguous()
        shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(shards, tensor, group=tp_group)
        return shards

    return gather


def _is_expert(name: str) -> bool:
    layer = _LAYER_NAME.match(name)
    return layer is not None and _EXPERT_NAME.match(layer.group(2)) is not None


def ep_all_gather_experts(
    named_params: Iterable[tuple[str, torch.Tensor]], hf_config: Any, ep_size: int, group=None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`megatron_to_hf` of an EP-sharded MoE model (TP = 1) with every rank's experts.

    Each local expert parameter is all-gathered over the expert-parallel group (megatron's, or
    `group`), and EP rank r's copy is named by r's global expert index; other parameters are
    replicated over EP and yielded once. Collective: every EP rank must consume the whole iterator.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    group = group if group is not None else mpu.get_expert_model_parallel_group()
    ep_rank = dist.get_rank(group)
    for raw_name, tensor in named_params:
        name = _strip_wrappers(raw_name)
        if not _is_expert(name):
            yield from megatron_to_hf([(name, tensor)], hf_config, ep_rank=ep_rank, ep_size=ep_size)
            continue
        local = tensor.detach().contiguous()
        shards = [torch.empty_like(local) for _ in range(ep_size)]
        dist.all_gather(shards, local, group=group)
        for rank, shard in enumerate(shards):
            yield from megatron_to_hf([(name, shard)], hf_config, ep_rank=rank, ep_size=ep_size)


def load_hf_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors checkpoint (single file or sharded with an index)."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (checkpoint_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{checkpoint_dir} has no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(checkpoint_dir / file)))
    return state


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters, then its routers' `expert_bias` buffers (the HF
    `e_score_correction_bias`): every tensor the conversion maps, in a fixed order."""
    yield from model.named_parameters()
    for name, buffer in model.named_buffers():
        if name.endswith(".router.expert_bias"):
            yield name, buffer


def copy_into_model(model: torch.nn.Module, megatron_state: dict[str, torch.Tensor]) -> None:
    """Copy converted shards into the model's weights (`named_weights`); each must be covered exactly."""
    params = {_strip_wrappers(n): p for n, p in named_weights(model)}
    missing, unexpected = sorted(set(params) - set(megatron_state)), sorted(set(megatron_state) - set(params))
    if missing or unexpected:
        raise ValueError(f"converted weights do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    with torch.no_grad():
        for name, param in params.items():
            source = megatron_state[name]
            if tuple(source.shape) != tuple(param.shape):
                raise ValueError(f"{name}: converted shape {tuple(source.shape)} != model shape {tuple(param.shape)}")
            if name.endswith(".router.expert_bias") and param.dtype != torch.float32:
                # Float16Module's .bfloat16() also cast this buffer; megatron routes with it in fp32
                # (TopKRouter._maintain_float32_expert_bias), so load it unrounded.
                param.data = param.data.float()
            param.copy_(source)


def load_hf_weights(model: torch.nn.Module, hf_state_dict: dict[str, torch.Tensor], hf_config: Any) -> None:
    """Load an HF state dict into this rank's model shards (TP/EP rank and size from megatron's state)."""
    from megatron.core import parallel_state as mpu

    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    ep_rank, ep_size = 0, 1
    if _arch(hf_config).num_experts:
        ep_rank, ep_size = mpu.get_expert_model_parallel_rank(), mpu.get_expert_model_parallel_world_size()
    copy_into_model(model, hf_to_megatron(hf_state_dict, hf_config, tp_rank, tp_size, ep_rank, ep_size))
