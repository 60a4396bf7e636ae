"""One trainer rank for test_reshard.py: save a checkpoint at one TP size, or resume it at another.

    RANK=r WORLD_SIZE=W MASTER_ADDR=127.0.0.1 MASTER_PORT=p python reshard_worker.py save|load MODEL ROOT OUT TP

save: one scheduled SFT step, save as checkpoint 1, then a second step (the uninterrupted run).
load: resume checkpoint 1 into a fresh actor, then the second step.
Writes OUT/rank{r}.pt: HF-named weights at checkpoint 1 (after the step in "save", after the load
in "load"), torch.rand(4) drawn right after the save / load, the second step's metrics and the
weights after it.
"""

import logging
import sys
from pathlib import Path

import torch

PROMPTS = [[5, 6, 7, 100], [9, 10], [300, 301, 302], [42]]
RESPONSES = [[11, 12, 13], [3, 4, 500, 501, 502], [400, 401], [7, 8, 9, 10, 11, 12]]


def main(mode: str, model: str, root: str, out: str, tp_size: int) -> None:
    from miles.algo.config import AlgoConfig
    from miles.checkpoint.store import load_checkpoint, save_checkpoint
    from miles.rollout.sample import Sample
    from miles.trainer import cpu_compat
    from miles.trainer.actor import MegatronActor
    from miles.trainer.config import TrainerConfig
    from miles.trainer.parallel import init_parallel, teardown_parallel

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    state = init_parallel(tp_size=tp_size)
    try:
        cfg = TrainerConfig(tensor_model_parallel_size=tp_size, lr=1e-3, lr_warmup_steps=4, weight_decay=0.01,
                            global_batch_size=4, num_steps_per_rollout=1, micro_batch_size=2)
        actor = MegatronActor(model, cfg, AlgoConfig(), state)
        samples = [Sample(group_id=0, index=i, prompt_tokens=p, response_tokens=r)
                   for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
        if mode == "save":
            actor.train_sft(samples)
            weights1 = {name: t.clone() for name, t in actor.export_hf_weights()}
            save_checkpoint(root, 1, actor, {"cursor": 4}, "trainer:\n  tensor_model_parallel_size: 2\n")
            draw, step, rl_state = torch.rand(4), 1, {"cursor": 4}
        else:
            step, rl_state = load_checkpoint(root, actor)
            draw = torch.rand(4)
            weights1 = {name: t.clone() for name, t in actor.export_hf_weights()}
        metrics = actor.train_sft(samples)
        weights2 = {name: t.clone() for name, t in actor.export_hf_weights()}
        torch.save({"step": step, "rl_state": rl_state, "draw": draw, "weights1": weights1, "metrics": metrics,
                    "weights2": weights2, "num_optimizer_steps": actor.num_optimizer_steps},
                   Path(out) / f"rank{state.rank}.pt")
    finally:
        teardown_parallel()


if __name__ == "__main__":  # required: megatron's checkpoint writer spawns a process that re-imports __main__
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
