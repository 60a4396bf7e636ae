"""One trainer rank for test_chunked_tp2.py: the vocab-sharded log-prob + entropy op and one RL step
of MegatronActor with trainer.logprob_impl full and chunked, at TP=N.

    RANK=r WORLD_SIZE=N MASTER_ADDR=127.0.0.1 MASTER_PORT=p python chunked_tp2_worker.py CKPT OUT N

Writes OUT/rank{r}.pt with, per impl, the old log-probs and entropies (temperature 0.7), the
train metrics, the HF-named weights after the step (TP all-gathered) and the log-probs after it;
at TP > 1 also the differences of the sharded kernel op (logprob_entropy_reference with
vocab_start and the TP group) from the unsharded op on the full weight: values, d hidden and this
rank's rows of d weight, and the error a target outside the vocabulary raises.
"""

import sys
from pathlib import Path

import torch

TEMPERATURE = 0.7
PROMPTS = [[5, 6, 7, 100], [9, 10], [300, 301, 302], [42]]
RESPONSES = [[11, 12, 13], [3, 4, 500, 501, 502], [400, 401], [7, 8, 9, 10, 11, 12]]
ADVANTAGES = [1.0, -0.5, 0.25, -1.0]


def sharded_op_diffs(tp_group, tp_rank: int, tp_size: int) -> dict:
    """max |sharded - unsharded| of logprob, entropy, d hidden, d weight (this rank's rows); error text."""
    from miles.kernels.logprob_entropy import logprob_entropy_reference

    gen = torch.Generator().manual_seed(0)
    num_tokens, hidden, vocab = 13, 16, 38
    hidden_NH = 2 * torch.randn(num_tokens, hidden, generator=gen)
    weight_VH = torch.randn(vocab, hidden, generator=gen)
    targets_N = torch.randint(0, vocab, (num_tokens,), generator=gen)
    g_lp_N, g_ent_N = torch.randn(num_tokens, generator=gen), torch.randn(num_tokens, generator=gen)
    rows = vocab // tp_size
    lo = tp_rank * rows

    def run(weight, **kwargs):
        h = hidden_NH.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        lp, ent = logprob_entropy_reference(h, w, targets_N, TEMPERATURE, chunk_size=5, vocab_chunk_size=7, **kwargs)
        ((lp * g_lp_N).sum() + (ent * g_ent_N).sum()).backward()
        return lp, ent, h.grad, w.grad

    full = run(weight_VH)
    shard = run(weight_VH[lo:lo + rows], vocab_start=lo, group=tp_group)
    diffs = {name: (a - b).abs().max().item()
             for name, a, b in zip(("logprob", "entropy", "d_hidden"), shard[:3], full[:3])}
    diffs["d_weight"] = (shard[3] - full[3][lo:lo + rows]).abs().max().item()
    diffs["targets_in_shard"] = int(((targets_N >= lo) & (targets_N < lo + rows)).sum())
    try:
        logprob_entropy_reference(hidden_NH, weight_VH[lo:lo + rows], torch.full((num_tokens,), vocab),
                                  vocab_start=lo, group=tp_group)
        diffs["error"] = None
    except ValueError as exc:
        diffs["error"] = str(exc)
    return diffs


def main(checkpoint: str, out: str, tp_size: int) -> None:
    from megatron.core import parallel_state as mpu

    from miles.algo.config import AlgoConfig
    from miles.rollout.sample import Sample
    from miles.trainer import cpu_compat
    from miles.trainer.actor import MegatronActor
    from miles.trainer.config import TrainerConfig
    from miles.trainer.parallel import init_parallel, teardown_parallel

    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    state = init_parallel(tp_size=tp_size)
    try:
        result = {"tp_rank": state.tp_rank}
        if tp_size > 1:
            result["op"] = sharded_op_diffs(mpu.get_tensor_model_parallel_group(), state.tp_rank, tp_size)
        samples = [Sample(group_id=0, index=i, prompt_tokens=p, response_tokens=r, loss_mask=[1] * (len(r) - 1) + [0])
                   for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
        for impl in ("full", "chunked"):
            trainer_cfg = TrainerConfig(tensor_model_parallel_size=tp_size, lr=1e-3, global_batch_size=4,
                                        num_steps_per_rollout=1, micro_batch_size=2, logprob_impl=impl)
            algo_cfg = AlgoConfig(eps_clip_high=0.28, entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1,
                                  use_tis=True, loss_reduction="token_mean")
            actor = MegatronActor(checkpoint, trainer_cfg, algo_cfg, state)
            old, entropy = actor.compute_logprobs(samples, TEMPERATURE, with_entropy=True)
            ref = actor.compute_ref_logprobs(samples, TEMPERATURE)
            gen = torch.Generator().manual_seed(0)
            rollout = [lp + 0.05 * torch.randn(lp.shape, generator=gen) for lp in old]
            advantages = [torch.full(lp.shape, a) for lp, a in zip(old, ADVANTAGES)]
            metrics = actor.train_rl(samples, advantages, old, rollout, [r - 0.1 for r in ref], temperature=TEMPERATURE)
            weights = {name: t.clone() for name, t in actor.export_hf_weights()}
            result[impl] = {"old_logprobs": old, "entropy": entropy, "metrics": metrics, "weights": weights,
                            "logprobs_after": actor.compute_logprobs(samples, TEMPERATURE)}
        torch.save(result, Path(out) / f"rank{state.rank}.pt")
    finally:
        teardown_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
