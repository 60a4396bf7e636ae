"""One trainer rank for test_tp2.py: load an HF checkpoint at TP=N, compute and export.

    RANK=r WORLD_SIZE=N MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tp_worker.py CKPT OUT TP

Writes OUT/rank{r}.pt with the response log-probs and entropies (temperature 0.7), the HF-named
gradients of sum(logprobs + entropy) and the HF-named weights exported by megatron_to_hf with
the real TP all-gather.
"""

import sys
from pathlib import Path

import torch


def main(checkpoint: str, out: str, tp_size: int) -> None:
    from transformers import AutoConfig

    from miles.trainer import cpu_compat, hf_convert, logprobs
    from miles.trainer.model_provider import build_gpt_model
    from miles.trainer.parallel import init_parallel, teardown_parallel

    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    state = init_parallel(tp_size=tp_size)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
        model = build_gpt_model(config, tp_size=tp_size)
        hf_convert.load_hf_weights(model, hf_convert.load_hf_state_dict(checkpoint), config)
        batch = logprobs.build_padded_batch([[5, 6, 7, 100], [9, 10]], [[11, 12, 13], [3, 4, 500, 501, 502]],
                                            pad_id=0)
        logits = model(batch.input_ids_BS, batch.position_ids_BS, batch.attention_mask_11SS)
        assert logits.shape[-1] == config.vocab_size // tp_size
        lps, ents = logprobs.response_logprobs_and_entropy(logits, batch, temperature=0.7)
        (torch.cat(lps).sum() + torch.cat(ents).sum()).backward()
        from megatron.core import parallel_state as mpu

        for name, param in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                # Each TP rank normalises only its own heads, so these grads are partial sums;
                # megatron's finalize_model_grads all-reduces them over TP (finalize_model_grads.py:354).
                torch.distributed.all_reduce(param.grad, group=mpu.get_tensor_model_parallel_group())
        gather = hf_convert.tp_all_gather()
        grads = dict(hf_convert.megatron_to_hf(((n, p.grad) for n, p in model.named_parameters()),
                                               config, tp_size, gather))
        weights = dict(hf_convert.megatron_to_hf(model.named_parameters(), config, tp_size, gather))
        torch.save({"logprobs": [t.detach() for t in lps], "entropy": [t.detach() for t in ents],
                    "grads": grads, "weights": weights, "tp_rank": state.tp_rank},
                   Path(out) / f"rank{state.rank}.pt")
    finally:
        teardown_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
