"""One trainer rank for test_ep2.py: an HF MoE checkpoint (qwen3_moe or glm4_moe) at EP=N (TP=1), forward, export.

    RANK=r WORLD_SIZE=N MASTER_ADDR=127.0.0.1 MASTER_PORT=p python ep_worker.py CKPT OUT

Rank r holds routed experts [r*E/N, (r+1)*E/N) of every MoE layer (dense layers, shared experts,
routers and their expert bias are replicated) and forwards its own batch (the allgather dispatcher
exchanges tokens between the EP ranks). Writes OUT/rank{r}.pt with the batch, the valid logits of
each row, the HF-named weights `megatron_to_hf` yields on this rank (its own experts) and those
`ep_all_gather_experts` yields (every expert).
"""

import sys
from pathlib import Path

import torch

PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302]]
RESPONSES = [[11, 12, 13, 14], [3], [400, 401, 402, 403, 404, 405]]


def main(checkpoint: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from transformers import AutoConfig

    from miles.trainer import cpu_compat, hf_convert, logprobs
    from miles.trainer.model_provider import build_gpt_model, hf_architecture

    torch.set_num_threads(1)
    cpu_compat.apply_cpu_compat()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mpu.initialize_model_parallel(expert_model_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
        arch = hf_architecture(config)
        model = build_gpt_model(config, tp_size=1).eval()
        ep_rank = mpu.get_expert_model_parallel_rank()
        moe = model.decoder.layers[arch.moe_layers[0]].mlp
        assert ep_rank == rank and len(moe.experts.local_experts) == arch.num_experts // world
        hf_convert.load_hf_weights(model, hf_convert.load_hf_state_dict(checkpoint), config)
        shift = rank % len(PROMPTS)  # a different batch on each rank
        prompts, responses = PROMPTS[shift:] + PROMPTS[:shift], RESPONSES[shift:] + RESPONSES[:shift]
        batch = logprobs.build_padded_batch(prompts, responses, pad_id=0)
        with torch.no_grad():
            logits = model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS)
        rows = [logits[b, :len(p) + len(r)].clone() for b, (p, r) in enumerate(zip(prompts, responses))]
        own = dict(hf_convert.megatron_to_hf(hf_convert.named_weights(model), config, ep_rank=ep_rank, ep_size=world))
        full = dict(hf_convert.ep_all_gather_experts(hf_convert.named_weights(model), config, world))
        torch.save({"ids": [p + r for p, r in zip(prompts, responses)], "logits": rows,
                    "weights": {k: v.clone() for k, v in own.items()},
                    "gathered": {k: v.clone() for k, v in full.items()}}, Path(out) / f"rank{rank}.pt")
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
