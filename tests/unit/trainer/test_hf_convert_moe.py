"""HF <-> Megatron conversion of Qwen3-MoE (router, per-expert [gate; up] / down, EP splits), and
Megatron MoE logits vs transformers.

Weights are redrawn with std 0.2 (as in test_hf_convert.py) so routing is decisive and any layout
mistake (expert order, gate/up order, EP block) changes logits by far more than the tolerance.
"""

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from miles.errors import ConfigError
from miles.trainer import hf_convert, logprobs
from miles.trainer.model_provider import build_gpt_model, transformer_config_from_hf

PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302]]
RESPONSES = [[11, 12, 13, 14], [3], [400, 401, 402, 403, 404, 405]]


def redraw(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: (1 + 0.2 * torch.randn(t.shape, generator=gen)) if name.endswith("norm.weight")
            else 0.2 * torch.randn(t.shape, generator=gen) for name, t in sorted(state.items())}


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "no_norm_topk"])
def moe_case(request, tiny_moe_model, tmp_path_factory):
    """(HF config, HF state dict, transformers model) of the tiny MoE with redrawn weights.

    transformers fuses experts on load ([E, 2I, H] gate_up), so the model is loaded from a saved
    checkpoint in the Hub's per-expert naming, the form the converter reads and writes.
    """
    config = AutoConfig.from_pretrained(tiny_moe_model)
    config.norm_topk_prob = request.param
    state = redraw(hf_convert.load_hf_state_dict(tiny_moe_model))
    out = tmp_path_factory.mktemp("moe-redrawn")
    config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.norm_topk_prob == request.param
    return config, state, model


def ep_round_trip(state, config, ep_size):
    shards = [hf_convert.hf_to_megatron(state, config, ep_rank=r, ep_size=ep_size) for r in range(ep_size)]
    back = {}
    for r, shard in enumerate(shards):
        for name, tensor in hf_convert.megatron_to_hf(shard.items(), config, ep_rank=r, ep_size=ep_size):
            assert name not in back or torch.equal(back[name], tensor), name  # replicated: identical
            back[name] = tensor
    return shards, back


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_moe_round_trip_is_bit_exact(moe_case, ep_size):
    config, state, _ = moe_case
    shards, back = ep_round_trip(state, config, ep_size)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    local = config.num_experts // ep_size
    assert sum(".local_experts." in n for n in shards[0]) == config.num_hidden_layers * local * 2


def test_moe_ep2_shard_layout(moe_case):
    config, state, _ = moe_case
    shards, _ = ep_round_trip(state, config, 2)
    layer = "model.layers.1.mlp"
    fc1 = shards[1]["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"]  # global expert 4 + 1
    assert torch.equal(fc1, torch.cat([state[f"{layer}.experts.5.gate_proj.weight"], state[f"{layer}.experts.5.up_proj.weight"]]))
    fc2 = shards[1]["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"]
    assert torch.equal(fc2, state[f"{layer}.experts.7.down_proj.weight"])
    for r in range(2):
        assert torch.equal(shards[r]["decoder.layers.1.mlp.router.weight"], state[f"{layer}.gate.weight"])
    assert not any("linear_fc1" in n and ".local_experts." not in n for n in shards[0])


def test_moe_conversion_rejects_bad_inputs(moe_case):
    config, state, _ = moe_case
    incomplete = {k: v for k, v in state.items() if k != "model.layers.0.mlp.experts.6.up_proj.weight"}
    with pytest.raises(ConfigError, match=r"lacks \['model\.layers\.0\.mlp\.experts\.6\.up_proj\.weight'\]"):
        hf_convert.hf_to_megatron(incomplete, config, ep_rank=1, ep_size=2)
    with pytest.raises(ConfigError, match="num_experts=8 is not divisible by expert_model_parallel_size=3"):
        hf_convert.hf_to_megatron(state, config, ep_size=3)
    with pytest.raises(ConfigError, match="MoE with tensor_model_parallel_size=2 is not supported"):
        hf_convert.hf_to_megatron(state, config, 0, 2)
    with pytest.raises(KeyError, match="local_experts.4"):  # EP=2 holds 4 experts per rank
        list(hf_convert.megatron_to_hf([("decoder.layers.0.mlp.experts.local_experts.4.linear_fc2.weight",
                                         torch.zeros(1))], config, ep_size=2))


def test_moe_transformer_config_maps_router(moe_case):
    config, _, _ = moe_case
    tc = transformer_config_from_hf(config, init_weights=False, ep_size=2)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (8, 2, config.moe_intermediate_size)
    assert tc.moe_router_score_function == "softmax" and tc.moe_router_pre_softmax == (not config.norm_topk_prob)
    assert tc.expert_model_parallel_size == 2 and tc.moe_aux_loss_coeff == 0.0 and not tc.moe_grouped_gemm


def test_megatron_moe_logits_match_transformers(megatron_tp1, moe_case):
    config, state, hf_model = moe_case
    batch = logprobs.build_padded_batch(PROMPTS, RESPONSES, pad_id=0, device=megatron_tp1.device)
    model = build_gpt_model(config, tp_size=1).eval()
    assert type(model.decoder.layers[0].mlp.experts).__name__ == "SequentialMLP"
    hf_convert.load_hf_weights(model, state, config)
    with torch.no_grad():
        logits_BSV = model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS).cpu()
        ref_BSV = hf_model(batch.input_ids_BS.cpu()).logits
    assert ref_BSV.abs().max() > 1.0  # logits far from flat, so the comparison is sensitive
    worst = max((logits_BSV[b, :p + r] - ref_BSV[b, :p + r]).abs().max().item()
                for b, (p, r) in enumerate(zip(batch.prompt_lens, batch.response_lens)))
    assert worst < 1e-5, worst
    exported = dict(hf_convert.megatron_to_hf(model.named_parameters(), config))
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)
