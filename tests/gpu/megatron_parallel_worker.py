"""One trainer rank for test_megatron_parallel.py: the GPU port of tests/integration/trainer/{tp,ep}_worker.py.

    RANK=r WORLD_SIZE=N LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python megatron_parallel_worker.py dense|moe CKPT OUT

Rank r computes on cuda:LOCAL_RANK over NCCL (on a CPU-only machine: gloo, with the CPU shims;
MILES_GPU_REHEARSAL=1). Writes OUT/rank{r}.pt holding CPU tensors only.

dense (TP=N, Qwen3): fp32 full-vocabulary logits of each row (the vocab shards all-gathered over
TP), response log-probs and entropies at T=0.7, the HF-named gradients of sum(logprobs + entropy)
and the HF-named weights exported by megatron_to_hf (TP all-gather); then the bf16 model's
(Float16Module) full logits of the same rows.

moe (EP=N, TP=1, Qwen3-MoE): every rank forwards all rows in a rank-dependent order (the
allgather dispatcher exchanges tokens between the EP ranks) and writes the fp32 logits of each
row, keyed by its token ids, and the HF-named weights this rank exports (its own experts).

Legend: B rows, S padded sequence length, V vocabulary, Vp this TP rank's vocabulary slice.
"""

import os
import sys
from pathlib import Path

import torch

PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302]]
RESPONSES = [[11, 12, 13, 14], [3, 4, 500, 501, 502], [400, 401, 402, 403, 404, 405]]
TEMPERATURE = 0.7


def full_rows(logits_BSVp: torch.Tensor, lengths: list[int], tp_size: int) -> list[torch.Tensor]:
    """The valid positions of each row with the whole vocabulary [len, V] (fp32, CPU)."""
    from miles.trainer.hf_convert import tp_all_gather

    logits_BSVp = logits_BSVp.detach().float().contiguous()
    logits_BSV = torch.cat(tp_all_gather()("logits", logits_BSVp), dim=-1) if tp_size > 1 else logits_BSVp
    return [logits_BSV[b, :n].cpu() for b, n in enumerate(lengths)]


def dense(checkpoint: str, out: str) -> None:
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.module import Float16Module
    from transformers import AutoConfig

    from miles.trainer import cpu_compat, hf_convert, logprobs
    from miles.trainer.model_provider import build_gpt_model
    from miles.trainer.parallel import init_parallel, teardown_parallel

    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    tp_size = int(os.environ["WORLD_SIZE"])
    state = init_parallel(tp_size=tp_size)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
        hf_state = hf_convert.load_hf_state_dict(checkpoint)
        batch = logprobs.build_padded_batch(PROMPTS, RESPONSES, pad_id=0, device=state.device)
        lengths = [len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES)]
        gather = hf_convert.tp_all_gather() if tp_size > 1 else None

        model = build_gpt_model(config, tp_size=tp_size)
        hf_convert.load_hf_weights(model, hf_state, config)
        logits_BSVp = model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS)
        assert logits_BSVp.shape[-1] == config.vocab_size // tp_size, logits_BSVp.shape
        lps, ents = logprobs.response_logprobs_and_entropy(logits_BSVp, batch, temperature=TEMPERATURE)
        (torch.cat(lps).sum() + torch.cat(ents).sum()).backward()
        for name, param in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                # Partial sums per TP rank; finalize_model_grads all-reduces them over TP in training.
                torch.distributed.all_reduce(param.grad, group=mpu.get_tensor_model_parallel_group())
        result = {
            "tp_rank": state.tp_rank, "backend": state.backend, "device": str(state.device),
            "logits_fp32": full_rows(logits_BSVp, lengths, tp_size),
            "logprobs": [t.detach().cpu() for t in lps], "entropy": [t.detach().cpu() for t in ents],
            "grads": {k: v.cpu() for k, v in hf_convert.megatron_to_hf(
                ((n, p.grad) for n, p in model.named_parameters()), config, tp_size, gather)},
            "weights": {k: v.cpu().clone() for k, v in hf_convert.megatron_to_hf(
                model.named_parameters(), config, tp_size, gather)},
        }
        del model, logits_BSVp
        module = build_gpt_model(config, tp_size=tp_size, params_dtype=torch.bfloat16)
        model = Float16Module(module.config, module)
        hf_convert.load_hf_weights(model, hf_state, config)
        model.eval()
        with torch.no_grad():
            logits_BSVp = model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS)
        result["logits_bf16"] = full_rows(logits_BSVp, lengths, tp_size)
        torch.save(result, Path(out) / f"rank{state.rank}.pt")
    finally:
        teardown_parallel()


def _init_expert_parallel() -> torch.device:
    """Process group (NCCL on cuda:LOCAL_RANK, else gloo) and megatron groups with EP = world size.

    `miles.trainer.parallel.init_parallel` has no expert-parallel size yet, hence done here.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from miles.trainer import cpu_compat

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        _allow_moe_router_without_transformer_engine()
    else:
        device = torch.device("cpu")
        cpu_compat.apply_cpu_compat()
        dist.init_process_group("gloo")
    mpu.initialize_model_parallel(expert_model_parallel_size=dist.get_world_size())
    tensor_parallel.model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    return device


def _allow_moe_router_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router GEMM (moe_utils.RouterGatingLinearFunction) reads
    `te_general_gemm`, a name bound only when Transformer Engine imports: without TE every MoE
    forward raises NameError, on GPU as on CPU. cpu_compat's shim S4 binds it to None (= the
    torch.mm path) on CPU only; the same is needed on a GPU without TE (reported to the lead)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        print("worker: bound megatron moe_utils.te_general_gemm = None (no Transformer Engine)", flush=True)


def moe(checkpoint: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from transformers import AutoConfig

    from miles.trainer import hf_convert, logprobs
    from miles.trainer.model_provider import build_gpt_model

    device = _init_expert_parallel()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        config = AutoConfig.from_pretrained(checkpoint)
        model = build_gpt_model(config, tp_size=1).eval()
        ep_rank = mpu.get_expert_model_parallel_rank()
        assert len(model.decoder.layers[0].mlp.experts.local_experts) == config.num_experts // world
        hf_convert.load_hf_weights(model, hf_convert.load_hf_state_dict(checkpoint), config)
        shift = rank % len(PROMPTS)  # a different batch order on each rank
        prompts, responses = PROMPTS[shift:] + PROMPTS[:shift], RESPONSES[shift:] + RESPONSES[:shift]
        batch = logprobs.build_padded_batch(prompts, responses, pad_id=0, device=device)
        with torch.no_grad():
            logits_BSV = model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS)
        rows = full_rows(logits_BSV, [len(p) + len(r) for p, r in zip(prompts, responses)], tp_size=1)
        weights = hf_convert.megatron_to_hf(model.named_parameters(), config, ep_rank=ep_rank, ep_size=world)
        torch.save({"ep_rank": ep_rank, "device": str(device),
                    "logits": {tuple(p + r): row for p, r, row in zip(prompts, responses, rows)},
                    "weights": {k: v.cpu().clone() for k, v in weights}}, Path(out) / f"rank{rank}.pt")
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"dense": dense, "moe": moe}[sys.argv[1]](sys.argv[2], sys.argv[3])
