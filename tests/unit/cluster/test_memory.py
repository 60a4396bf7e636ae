"""The memory estimate against hand-computed numbers, and parameter counts against published sizes."""

import pytest

from miles.cluster.memory import count_params, estimate_memory
from miles.cluster.plan import PlanConfig
from miles.config.loader import load_config

TINY_DENSE = PlanConfig(architecture="qwen3", num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                        num_query_groups=1, head_dim=4, vocab_size=10, tokens_per_microbatch=4, recompute="none",
                        sequence_parallel=False, distributed_optimizer=False)


def test_dense_gqa_counts_by_hand():
    c = count_params(TINY_DENSE)
    # q 8x8 + k,v 2x(8x4) + o 8x8 + qk-norms 2x4 + two RMSNorms 2x8 = 216
    assert (c.attention, c.dense_mlp, c.embedding, c.output) == (216, 3 * 8 * 16, 80, 80 + 8)
    assert c.total == 80 + 88 + 2 * (216 + 384) == 1368


def test_dense_fp32_no_sharding_by_hand():
    est = estimate_memory(TINY_DENSE, tp=1, world_size=1, bf16=False)
    assert est.params_per_gpu == 1368
    assert (est.weights, est.grads, est.optimizer) == (1368 * 4, 1368 * 4, 1368 * 8)
    # two layers kept whole: 34*s*h*(4/2) each = 2176; fp32 logits and grads: 4*10*4*2 = 320
    assert est.activations == 2 * 2176 + 320
    assert est.total == 5472 + 5472 + 10944 + 4672


def test_dense_bf16_tp2_distributed_optimizer_full_recompute_by_hand():
    from dataclasses import replace

    plan = replace(TINY_DENSE, tokens_per_microbatch=8, recompute="full", sequence_parallel=True,
                   distributed_optimizer=True)
    est = estimate_memory(plan, tp=2, world_size=4, bf16=True)  # dp = 2
    assert est.params_per_gpu == 684
    assert (est.weights, est.grads, est.optimizer) == (684 * 2, 684 * 4, 684 / 2 * 12)
    # inputs kept: 2 layers * s*h*2/TP = 128; one layer recomputed: 34*8*8/2 = 1088; logits 8*10/2*8 = 320
    assert est.activations == 128 + 1088 + 320


MOE_MLA = PlanConfig(architecture="glm_moe_dsa", num_layers=3, num_dense_layers=1, hidden_size=4, ffn_hidden_size=6,
                     num_attention_heads=2, attention="mla", q_lora_rank=2, kv_lora_rank=2, qk_nope_head_dim=2,
                     qk_rope_head_dim=1, v_head_dim=2, sparse_attention="dsa", index_n_heads=1, index_head_dim=2,
                     index_topk=4, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=2, num_shared_experts=1,
                     vocab_size=5, tokens_per_microbatch=4, pipeline_parallel=2, expert_parallel=2, recompute="none",
                     sequence_parallel=False)


def test_moe_mla_dsa_counts_by_hand():
    c = count_params(MOE_MLA)
    # q: 4x2 + norm 2 + 2x(2 heads x 3) = 22; kv: 4x3 + norm 2 + 2x(2 x 4) = 30; o: 2x2x4 = 16;
    # indexer: 2x(1x2) + 4x2 + LayerNorm 2x2 + 4x1 = 20; two RMSNorms 8
    assert c.attention == 22 + 30 + 16 + 20 + 8 == 96
    assert (c.experts, c.shared_and_router, c.dense_mlp) == (4 * 3 * 4 * 2, 3 * 4 * 2 + 4 * 4, 3 * 4 * 6)
    assert (c.num_dense_layers, c.num_moe_layers) == (1, 2)
    assert c.total == 20 + 24 + (96 + 72) + 2 * (96 + 96 + 40) == 676


def test_moe_pp2_ep2_distributed_optimizer_by_hand():
    est = estimate_memory(MOE_MLA, tp=1, world_size=4, bf16=False)  # dp = 4/(1*2*1) = 2, expert dp = 4/(2*1*2) = 1
    # heaviest stage: 2 layers (both MoE) + the larger end (output 24): dense 24 + 2*(96+40), experts 2*96/EP2
    assert est.params_per_gpu == 296 + 96
    assert (est.weights, est.grads) == (392 * 4, 392 * 4)
    assert est.optimizer == (296 / 2 + 96 / 1) * 8
    # per MoE layer: 34*s*h*(4/2) = 1088 + dispatched tokens s*top_k*(h + 3*ffn)*4 = 320; logits 4*5*4*2 = 160
    assert est.activations == 2 * (1088 + 320) + 160


def test_published_sizes():
    glm5 = count_params(load_config("glm5").plan)
    assert glm5.total == pytest.approx(744e9, rel=0.005)  # GLM-5: 744B total
    qwen = count_params(load_config("qwen3-small").plan)
    assert qwen.total == pytest.approx(1.72e9, rel=0.01)  # Qwen3-1.7B, tied embeddings
    assert qwen.total - qwen.embedding - qwen.output == pytest.approx(1.4e9, rel=0.02)  # "1.4B non-embedding"


def test_layout_must_divide_the_world():
    with pytest.raises(ValueError, match="not divisible"):
        estimate_memory(MOE_MLA, tp=1, world_size=6, bf16=False)


def test_table_lists_the_four_parts_and_the_total():
    text = estimate_memory(TINY_DENSE, tp=1, world_size=1, bf16=False).table()
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["weights", "grads", "optimizer", "activations", "total"]
