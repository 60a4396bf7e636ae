"""GLM-4.5-style MoE (HF glm4_moe) in the trainer and against the engine's routing capture.

Two tiny checkpoints, weights redrawn at std 0.2 (so routing is decisive and the random
e_score_correction_bias, also redrawn, is large enough to move experts):
- "glm45": as GLM-4.5 (n_group 1, q/k/v bias, no q/k norm), the conftest fixture;
- "grouped": DeepSeek-V3-style group-limited routing (n_group 2, topk_group 1) with q/k norm.
Both: 3 layers, the first dense, 8 routed experts top-2, sigmoid router, routed_scaling_factor 2.5,
one shared expert, partial RoPE 0.5.

Checked: TransformerConfig mapping and refusals; HF -> Megatron -> HF bit-exact at EP 1/2/4 with
the shard layout (dense MLP, shared experts, router bias, fused q/k/v bias); Megatron logits =
transformers logits; the bias changes routing and the trainer's own routing (megatron RECORD)
equals the engine's capture with and without it; replaying a perturbed engine's capture
reproduces that engine's log-probs, and shifted experts change them (R3 with dense layers: dumps
hold every layer, replay takes the MoE ones).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from miles.engines.embedded.routing import RouterCapture, perturb_router_selection
from miles.errors import ConfigError
from miles.routing.replay import RoutingReplay, replay_targets
from miles.trainer import hf_convert, logprobs
from miles.trainer.model_provider import build_gpt_model, hf_architecture, transformer_config_from_hf

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302]]
RESPONSES = [[11, 12, 13, 14], [3], [400, 401, 402, 403, 404, 405]]


def redraw(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: (1 + 0.2 * torch.randn(t.shape, generator=gen)) if name.endswith("norm.weight")
            else 0.2 * torch.randn(t.shape, generator=gen) for name, t in sorted(state.items())}


@pytest.fixture(scope="module")
def grouped_glm4_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "glm4-moe-grouped"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(out), "--glm4-moe", "--layers", "3",
                    "--n-group", "2", "--topk-group", "1", "--qk-norm"],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


@pytest.fixture(scope="module", params=["glm45", "grouped"])
def glm4_case(request, tiny_glm4_moe_model, grouped_glm4_model, tmp_path_factory):
    """(HF config, HF state dict, checkpoint dir, transformers model) with redrawn weights."""
    src = tiny_glm4_moe_model if request.param == "glm45" else grouped_glm4_model
    config = AutoConfig.from_pretrained(src)
    state = redraw(hf_convert.load_hf_state_dict(src))
    out = tmp_path_factory.mktemp(f"glm4-{request.param}")
    config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(bias, state["model.layers.1.mlp.gate.e_score_correction_bias"]) and bias.abs().min() > 0
    return config, state, out, model


def megatron_model(config, state):
    model = build_gpt_model(config, tp_size=1).eval()
    hf_convert.load_hf_weights(model, state, config)
    return model


def test_glm4_transformer_config(glm4_case):
    config, _, _, _ = glm4_case
    tc = transformer_config_from_hf(config, init_weights=False, ep_size=2)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size, tc.ffn_hidden_size) == (8, 2, 32, 128)
    assert tc.moe_router_score_function == "sigmoid" and tc.moe_router_enable_expert_bias
    assert tc.moe_router_bias_update_rate == 0.0 and tc.moe_router_topk_scaling_factor == 2.5
    assert tc.moe_shared_expert_intermediate_size == 32 and not tc.moe_shared_expert_gate
    assert tc.moe_layer_freq == [0, 1, 1] and tc.moe_router_dtype == "fp32"
    grouped = config.n_group == 2
    assert (tc.moe_router_num_groups, tc.moe_router_group_topk) == ((2, 1) if grouped else (None, None))
    assert tc.add_qkv_bias == (not grouped) and tc.qk_layernorm == grouped
    arch = hf_architecture(config)
    assert arch.moe_layers == (1, 2) and arch.num_experts == 8 and arch.top_k == 2


@pytest.mark.parametrize("field, value, message", [
    ("norm_topk_prob", False, r"norm_topk_prob=False with num_experts_per_tok=2 cannot be expressed"),
    ("n_shared_experts", 0, r"n_shared_experts=0: glm4_moe without shared experts"),
    ("first_k_dense_replace", 3, r"first_k_dense_replace=3 must lie in \[0, num_hidden_layers=3\)"),
    ("topk_group", 2, None),  # n_group 4, topk_group 2, top-2: megatron ranks groups by their top-1
])
def test_glm4_refuses_what_megatron_cannot_express(glm4_case, field, value, message):
    config = AutoConfig.from_pretrained(glm4_case[2])  # a fresh copy: the case's config is shared
    setattr(config, field, value)
    if field == "topk_group":
        config.n_group, message = 4, r"HF ranks groups by their top-2 scores, megatron by their top .* = 1"
    with pytest.raises(ConfigError, match=message):
        transformer_config_from_hf(config, init_weights=False)


def ep_round_trip(state, config, ep_size):
    shards = [hf_convert.hf_to_megatron(state, config, ep_rank=r, ep_size=ep_size) for r in range(ep_size)]
    back = {}
    for r, shard in enumerate(shards):
        for name, tensor in hf_convert.megatron_to_hf(shard.items(), config, ep_rank=r, ep_size=ep_size):
            assert name not in back or torch.equal(back[name], tensor), name  # replicated: identical
            back[name] = tensor
    return shards, back


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_glm4_round_trip_is_bit_exact(glm4_case, ep_size):
    config, state, _, _ = glm4_case
    shards, back = ep_round_trip(state, config, ep_size)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[name], tensor) for name, tensor in state.items())
    assert sum(".local_experts." in n for n in shards[0]) == 2 * (8 // ep_size) * 2  # 2 MoE layers, fc1 + fc2


def test_glm4_shard_layout(glm4_case):
    config, state, _, _ = glm4_case
    shards, _ = ep_round_trip(state, config, 2)
    dense, moe = "model.layers.0", "model.layers.2"
    fc1 = shards[1]["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([state[f"{dense}.mlp.gate_proj.weight"], state[f"{dense}.mlp.up_proj.weight"]]))
    assert not any(n.startswith("decoder.layers.0.mlp.") and "linear_fc" not in n for n in shards[0])
    for r in range(2):
        shard = shards[r]
        assert torch.equal(shard["decoder.layers.2.mlp.router.expert_bias"],
                           state[f"{moe}.mlp.gate.e_score_correction_bias"])
        assert torch.equal(shard["decoder.layers.2.mlp.shared_experts.linear_fc1.weight"],
                           torch.cat([state[f"{moe}.mlp.shared_experts.gate_proj.weight"],
                                      state[f"{moe}.mlp.shared_experts.up_proj.weight"]]))
        assert torch.equal(shard["decoder.layers.2.mlp.shared_experts.linear_fc2.weight"],
                           state[f"{moe}.mlp.shared_experts.down_proj.weight"])
    assert torch.equal(shards[1]["decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight"],
                       state[f"{moe}.mlp.experts.7.down_proj.weight"])
    if config.attention_bias:  # group 0: its 2 query heads, then its key head, then its value head (16 each)
        bias = shards[0]["decoder.layers.1.self_attention.linear_qkv.bias"]
        q, k, v = (state[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv")
        assert torch.equal(bias[:64], torch.cat([q[:32], k[:16], v[:16]]))
    else:
        assert not any("linear_qkv.bias" in n for n in shards[0])


def test_glm4_mtp_weights_are_skipped(glm4_case):
    config, state, _, _ = glm4_case
    mtp = {**state, "model.layers.3.eh_proj.weight": torch.zeros(4, 4),
           "model.layers.3.mlp.gate.weight": torch.zeros(8, 64)}
    assert hf_convert.hf_to_megatron(mtp, config).keys() == hf_convert.hf_to_megatron(state, config).keys()
    with pytest.raises(ConfigError, match=r"no Megatron mapping: \['model\.layers\.1\.foo'\]"):
        hf_convert.hf_to_megatron({**state, "model.layers.1.foo": torch.zeros(1)}, config)


def test_megatron_glm4_logits_match_transformers(megatron_tp1, glm4_case):
    config, state, _, hf_model = glm4_case
    batch = logprobs.build_padded_batch(PROMPTS, RESPONSES, pad_id=0, device=megatron_tp1.device)
    model = megatron_model(config, state)
    assert [type(layer.mlp).__name__ for layer in model.decoder.layers] == ["MLP", "MoELayer", "MoELayer"]
    with torch.no_grad():
        logits_BSV = model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS).cpu()
        ref_BSV = hf_model(batch.input_ids_BS.cpu()).logits
    assert ref_BSV.abs().max() > 1.0
    worst = max((logits_BSV[b, :p + r] - ref_BSV[b, :p + r]).abs().max().item()
                for b, (p, r) in enumerate(zip(batch.prompt_lens, batch.response_lens)))
    assert worst < 1e-5, worst
    exported = dict(hf_convert.megatron_to_hf(hf_convert.named_weights(model), config))
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)


def engine_capture(hf_model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The engine's routed experts [len - 1, L, K] per sequence (RouterCapture, one forward each)."""
    capture = RouterCapture(hf_model)
    out = []
    for ids in sequences:
        with torch.no_grad():
            hf_model(torch.tensor([ids]))
        out.append(capture.take(len(ids))[:-1])
    capture.remove()
    return out


def trainer_record(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """megatron's own routing [len - 1, M, K] per sequence (RouterReplay RECORD)."""
    replay, out = RoutingReplay(model), []
    device = next(model.parameters()).device
    for ids in sequences:
        replay.record()
        with torch.no_grad():
            model(torch.tensor([ids], device=device), torch.arange(len(ids), device=device)[None], None)
        out.append(torch.stack(replay.recorded(), dim=1)[:-1].cpu())
        replay.clear()
    return out


def as_sets(idx: torch.Tensor) -> np.ndarray:
    return np.sort(idx.numpy(), axis=-1)


def test_expert_bias_changes_routing_and_trainer_routes_like_engine(megatron_tp1, glm4_case):
    config, state, ckpt, hf_model = glm4_case
    moe = list(hf_architecture(config).moe_layers)
    sequences = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    unbiased_state = {k: torch.zeros_like(v) if k.endswith("e_score_correction_bias") else v for k, v in state.items()}
    unbiased_hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for layer in moe:
        unbiased_hf.model.layers[layer].mlp.gate.e_score_correction_bias.zero_()
    captures = {}
    for case, hf, st in (("biased", hf_model, state), ("unbiased", unbiased_hf, unbiased_state)):
        captures[case] = engine_capture(hf, sequences)
        trainer = trainer_record(megatron_model(config, st), sequences)
        for eng_TLK, rec_TMK in zip(captures[case], trainer):
            assert torch.equal(eng_TLK[:, 0], torch.zeros_like(eng_TLK[:, 0]))  # the dense layer: SGLang's zeros
            assert np.array_equal(as_sets(eng_TLK[:, moe]), as_sets(rec_TMK.to(torch.int32))), case
    same = np.concatenate([(as_sets(a[:, moe]) == as_sets(b[:, moe])).all(-1).ravel()
                           for a, b in zip(captures["biased"], captures["unbiased"])])
    assert 1.0 - same.mean() > 0.1, same.mean()  # the bias moves a real share of (token, layer) choices


def token_logprobs(logits_SV: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for t < len - 1."""
    return torch.log_softmax(logits_SV[:len(ids) - 1].double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_replaying_engine_routing_reproduces_engine_logprobs(megatron_tp1, glm4_case, tmp_path):
    config, state, ckpt, _ = glm4_case
    arch = hf_architecture(config)
    sequences = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    engine = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    perturb_router_selection(engine, 1.0)  # the engine routes elsewhere than the trainer would
    dumps = [d.numpy() for d in engine_capture(engine, sequences)]
    with torch.no_grad():
        engine_lp = [token_logprobs(engine(torch.tensor([ids])).logits[0], ids) for ids in sequences]
    model = megatron_model(config, state)
    batch = logprobs.build_padded_batch(PROMPTS, RESPONSES, pad_id=0, device=megatron_tp1.device)
    replay = RoutingReplay(model)
    assert replay.num_layers == len(arch.moe_layers) == 2

    def run(dumps_TLK=None) -> list[torch.Tensor]:
        if dumps_TLK is not None:
            replay.replay_forward(replay_targets(batch, dumps_TLK, num_layers=arch.num_layers, top_k=arch.top_k,
                                                 num_experts=arch.num_experts, moe_layers=arch.moe_layers))
        with torch.no_grad():
            logits_BSV = model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS).cpu()
        replay.clear()
        return [token_logprobs(logits_BSV[b], ids) for b, ids in enumerate(sequences)]

    def gap(a, b) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    plain, replayed, shifted = run(), run(dumps), run([(d + 1) % arch.num_experts for d in dumps])
    assert gap(replayed, engine_lp) < 1e-5, gap(replayed, engine_lp)
    assert gap(plain, engine_lp) > 1e-2, gap(plain, engine_lp)  # without R3 the trainer computes another network
    assert gap(shifted, plain) > 1e-2, gap(shifted, plain)


def test_expert_bias_is_loaded_unrounded_in_bf16(megatron_tp1, glm4_case):
    from megatron.core.transformer.module import Float16Module

    config, state, _, _ = glm4_case
    module = build_gpt_model(config, tp_size=1, params_dtype=torch.bfloat16)
    model = Float16Module(module.config, module)  # casts every floating buffer, the expert bias too
    hf_convert.load_hf_weights(model, state, config)
    bias = dict(model.named_buffers())["module.decoder.layers.1.mlp.router.expert_bias"]
    hf_bias = state["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert not torch.equal(hf_bias.bfloat16().float(), hf_bias)  # a bf16 copy would route differently
    assert bias.dtype == torch.float32 and torch.equal(bias, hf_bias)
    exported = dict(hf_convert.megatron_to_hf(hf_convert.named_weights(model), config))
    assert exported["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(exported["model.layers.1.mlp.gate.e_score_correction_bias"], hf_bias)


def test_rl_step_trains_the_router_but_keeps_the_expert_bias(megatron_tp1, glm4_case):
    from miles.algo.config import AlgoConfig
    from miles.rollout.sample import Sample
    from miles.trainer.actor import MegatronActor
    from miles.trainer.config import TrainerConfig

    config, state, ckpt, _ = glm4_case
    actor = MegatronActor(str(ckpt), TrainerConfig(lr=1e-2), AlgoConfig(), megatron_tp1)
    samples = [Sample(group_id=i // 2, index=i % 2, prompt_tokens=p, response_tokens=r, loss_mask=[1] * len(r))
               for i, (p, r) in enumerate(zip(PROMPTS + PROMPTS[:1], RESPONSES + RESPONSES[:1]))]
    old = actor.compute_logprobs(samples)
    advantages = [torch.full((len(s.response_tokens),), 1.0 if i % 2 else -1.0) for i, s in enumerate(samples)]
    actor.train_rl(samples, advantages, old)
    after = dict(hf_convert.megatron_to_hf(hf_convert.named_weights(actor.model), config))
    for layer in hf_architecture(config).moe_layers:  # megatron's bias update ran with rate 0: a no-op
        name = f"model.layers.{layer}.mlp.gate"
        assert torch.equal(after[f"{name}.e_score_correction_bias"], state[f"{name}.e_score_correction_bias"])
        assert not torch.equal(after[f"{name}.weight"], state[f"{name}.weight"])
