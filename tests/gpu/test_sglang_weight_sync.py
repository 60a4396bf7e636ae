"""NCCL weight sync: the Megatron trainer on GPU 0 pushes its weights into real SGLang on GPU 1.

Sequence (shared/reference/sglang-weight-sync-facts.md): DistributedWeightSender (backend nccl,
NCCL_CUMEM_ENABLE=0 in this process) POSTs /init_weights_update_group and joins as rank 0, then
per bucket POSTs /update_weights_from_distributed while broadcasting the HF-named tensors from
`actor.export_hf_weights()` in the same order.

The trainer's weights are first moved away from the checkpoint (two SFT steps at lr 1e-2), so the
engine, still on the checkpoint, disagrees with the trainer by far more than bf16 noise. After
the sync the engine's fresh samples carry the pushed weight_version and logprobs within bf16
noise of the trainer's recompute. Reported: mismatch before/after, sync seconds and MB.
"""

import pytest
import torch

from miles.algo.config import AlgoConfig
from miles.rollout.sample import Sample
from miles.trainer.actor import MegatronActor
from miles.trainer.config import TrainerConfig
from miles.weight_sync.distributed import DistributedWeightSender

from .conftest import free_port, generate_samples, mismatch

pytestmark = pytest.mark.gpu(count=2)

TEMPERATURE = 0.8
NUM_NEW_TOKENS = 24
PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302], [42], [1, 3, 4, 5, 6, 7, 8], [77, 78], [8], [60, 61, 62]]
SFT_SAMPLES = [Sample(group_id=i, index=0, prompt_tokens=p, response_tokens=r, loss_mask=[1] * len(r))
               for i, (p, r) in enumerate([([5, 6, 7], [400, 401, 402, 403]), ([9, 10], [410, 411, 412]),
                                           ([42], [420, 421, 422, 423, 424]), ([77, 78], [430, 431])])]
SFT_LR = 1e-2
AFTER_MEAN_TOL = 2e-2
AFTER_MAX_TOL = 0.15


@pytest.fixture(scope="module")
def actor(dense_model, trainer_parallel):
    return MegatronActor(str(dense_model), TrainerConfig(bf16=True, micro_batch_size=len(PROMPTS)), AlgoConfig(),
                         trainer_parallel)


def test_nccl_weight_sync_into_sglang(engine_slot, dense_model, actor, record):
    engine = engine_slot.start(dense_model)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        samples = generate_samples(engine.url, PROMPTS, NUM_NEW_TOKENS, TEMPERATURE)
        at_start = mismatch(samples, actor.compute_logprobs(samples, TEMPERATURE))
        for _ in range(2):
            sft = actor.train_sft(SFT_SAMPLES, lr=SFT_LR)
        assert sft["train/grad_norm"] > 0
        samples = generate_samples(engine.url, PROMPTS, NUM_NEW_TOKENS, TEMPERATURE, seed=100)
        before = mismatch(samples, actor.compute_logprobs(samples, TEMPERATURE))

        sender = DistributedWeightSender([engine.url], "127.0.0.1", free_port(), backend=backend,
                                         group_name="miles_gpu_test", timeout_s=180)
        sender.connect()
        try:
            first = sender.send(actor.export_hf_weights(), weight_version="sft-1")
            second = sender.send(actor.export_hf_weights(), weight_version="sft-2")  # the steady-state cost
        finally:
            sender.close()

        samples = generate_samples(engine.url, PROMPTS, NUM_NEW_TOKENS, TEMPERATURE, seed=200)
        after = mismatch(samples, actor.compute_logprobs(samples, TEMPERATURE))
    finally:
        engine_slot.release()  # its weights are no longer the checkpoint's
    record("nccl_weight_sync", {
        "backend": backend, "mismatch_at_start": at_start, "mismatch_before_sync": before, "mismatch_after_sync": after,
        "num_tensors": first.num_tensors, "mb": round(first.num_bytes / 1e6, 3),
        "first_send_s": round(first.seconds, 4), "second_send_s": round(second.seconds, 4),
    })
    assert {s.weight_version for s in samples} == {"sft-2"}
    assert first.num_bytes > 2e6  # the whole bf16 model (~2.9 MB) went over
    assert after["mean_abs"] < AFTER_MEAN_TOL and after["max_abs"] < AFTER_MAX_TOL, after
    assert before["mean_abs"] > 5 * after["mean_abs"] and before["max_abs"] > 0.1, (before, after)
