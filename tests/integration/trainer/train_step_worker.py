"""One trainer rank for test_train_step_tp2.py: one RL train step of MegatronActor at TP=N.

    RANK=r WORLD_SIZE=W MASTER_ADDR=127.0.0.1 MASTER_PORT=p python train_step_worker.py CKPT OUT TP

W / TP ranks are data parallel. Writes OUT/rank{r}.pt with the old log-probs (temperature 0.7),
the train metrics, the HF-named weights exported after the step (real TP all-gather) and the
log-probs after the step.
"""

import sys
from pathlib import Path

import torch

TEMPERATURE = 0.7
PROMPTS = [[5, 6, 7, 100], [9, 10], [300, 301, 302], [42]]
RESPONSES = [[11, 12, 13], [3, 4, 500, 501, 502], [400, 401], [7, 8, 9, 10, 11, 12]]
ADVANTAGES = [1.0, -0.5, 0.25, -1.0]


def main(checkpoint: str, out: str, tp_size: int) -> None:
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
        trainer_cfg = TrainerConfig(tensor_model_parallel_size=tp_size, lr=1e-3, global_batch_size=4,
                                    num_steps_per_rollout=1, micro_batch_size=1)
        algo_cfg = AlgoConfig(eps_clip_high=0.28, entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1,
                              use_tis=True, loss_reduction="token_mean")
        actor = MegatronActor(checkpoint, trainer_cfg, algo_cfg, state)
        samples = [Sample(group_id=0, index=i, prompt_tokens=p, response_tokens=r, loss_mask=[1] * (len(r) - 1) + [0])
                   for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
        old = actor.compute_logprobs(samples, TEMPERATURE)
        gen = torch.Generator().manual_seed(0)
        rollout = [lp + 0.05 * torch.randn(lp.shape, generator=gen) for lp in old]
        ref = [lp - 0.1 * torch.rand(lp.shape, generator=gen) for lp in old]
        advantages = [torch.full(lp.shape, a) for lp, a in zip(old, ADVANTAGES)]
        metrics = actor.train_rl(samples, advantages, old, rollout, ref, temperature=TEMPERATURE)
        weights = {name: t.clone() for name, t in actor.export_hf_weights()}
        after = actor.compute_logprobs(samples, TEMPERATURE)
        torch.save({"old_logprobs": old, "metrics": metrics, "weights": weights, "logprobs_after": after,
                    "tp_rank": state.tp_rank, "dp_rank": state.dp_rank}, Path(out) / f"rank{state.rank}.pt")
    finally:
        teardown_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
