"""Right after a weight sync the engine's sampled-token logprobs equal the trainer's recompute.

MegatronActor (this pytest process, a 1-rank gloo world, fp32 on CPU) and ONE embedded engine
subprocess start from the same tiny checkpoint. Each test first moves the trainer's weights with
high-lr SFT steps, checks that the engine (still on its old weights) now disagrees with the
trainer by > 1e-2, pushes `actor.export_hf_weights()` through `WeightSyncer` (one test per
transport), and then checks that the engine's seeded samples carry logprobs within 1e-4 of
`actor.compute_logprobs` (both are fp32: expected ~1e-6) and the pushed weight_version.
"""

import pytest
import requests
import torch

from miles.algo.config import AlgoConfig
from miles.rollout.sample import Sample, SampleStatus
from miles.trainer.actor import MegatronActor
from miles.trainer.config import TrainerConfig
from miles.weight_sync.config import WeightSyncConfig
from miles.weight_sync.syncer import WeightSyncer

from .conftest import free_port

TEMPERATURE = 0.8
NUM_NEW_TOKENS = 16
PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302], [42], [1, 3, 4, 5, 6, 7, 8], [77, 78], [8], [60, 61, 62, 63]]
SFT_SAMPLES = [Sample(group_id=i, index=0, prompt_tokens=p, response_tokens=r, loss_mask=[1] * len(r))
               for i, (p, r) in enumerate([([5, 6, 7], [400, 401, 402, 403]), ([9, 10], [410, 411, 412]),
                                           ([42], [420, 421, 422, 423, 424]), ([77, 78], [430, 431])])]
SFT_LR = 1e-2
SFT_STEPS = 2
PARITY_TOL = 1e-4
MIN_DRIFT = 1e-2


@pytest.fixture(scope="module")
def parallel():
    """A TP=1 world of this process; shares tests/unit/trainer's session world if that one is up."""
    from megatron.core import parallel_state as mpu

    from miles.trainer import cpu_compat
    from miles.trainer.parallel import ParallelState, init_parallel, teardown_parallel

    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    if mpu.model_parallel_is_initialized():  # `megatron_tp1` (session scope) of tests/unit/trainer owns it
        assert mpu.get_tensor_model_parallel_world_size() == 1 and torch.distributed.get_world_size() == 1
        yield ParallelState(rank=0, world_size=1, local_rank=0, tp_size=1, tp_rank=0, pp_size=1, pp_rank=0,
                            dp_size=1, dp_rank=0, backend=torch.distributed.get_backend(),
                            device=torch.device("cpu"))
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    state = init_parallel(tp_size=1, seed=1234, env=env)
    yield state
    teardown_parallel()
    assert not torch.distributed.is_initialized()  # later test files may create their own default group


@pytest.fixture(scope="module")
def actor(parallel, tiny_model) -> MegatronActor:
    return MegatronActor(str(tiny_model), TrainerConfig(micro_batch_size=4), AlgoConfig(), parallel)


@pytest.fixture(scope="module")
def engine(start_engine, tiny_model):
    """One embedded engine on the same checkpoint (--num-threads 1), stopped by PID at module end."""
    return start_engine(tiny_model)


def generate(url: str, seed: int) -> list[Sample]:
    """Seeded samples of every prompt (one batch request), as the rollout would build them."""
    body = {"input_ids": PROMPTS, "return_logprob": True,
            "sampling_params": [{"max_new_tokens": NUM_NEW_TOKENS, "temperature": TEMPERATURE, "ignore_eos": True,
                                 "sampling_seed": seed + i} for i in range(len(PROMPTS))]}
    r = requests.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    samples = []
    for i, (prompt, out) in enumerate(zip(PROMPTS, r.json(), strict=True)):
        meta = out["meta_info"]
        assert len(out["output_ids"]) == NUM_NEW_TOKENS
        assert [tok for _, tok, _ in meta["output_token_logprobs"]] == out["output_ids"]
        samples.append(Sample(group_id=i, index=0, prompt_tokens=prompt, response_tokens=out["output_ids"],
                              loss_mask=[1] * NUM_NEW_TOKENS,
                              rollout_logprobs=[lp for lp, _, _ in meta["output_token_logprobs"]],
                              status=SampleStatus.TRUNCATED, weight_version=meta["weight_version"]))
    return samples


def engine_vs_trainer(actor: MegatronActor, samples: list[Sample]) -> float:
    """max over all tokens of |engine logprob - trainer logprob|."""
    trainer = actor.compute_logprobs(samples, TEMPERATURE)
    return max((torch.tensor(s.rollout_logprobs) - lp).abs().max().item() for s, lp in zip(samples, trainer))


@pytest.mark.parametrize("transport", ["distributed", "disk"])
def test_engine_logprobs_equal_trainer_logprobs_after_sync(transport, actor, engine, tmp_path):
    for _ in range(SFT_STEPS):  # new weights, clearly away from what the engine holds
        metrics = actor.train_sft(SFT_SAMPLES, lr=SFT_LR)
    assert metrics["train/grad_norm"] > 0
    drift = engine_vs_trainer(actor, generate(engine.url, seed=1000))
    assert drift > MIN_DRIFT, f"SFT moved the logprobs by only {drift:.2e}: the parity check would prove nothing"

    version = f"sft-{transport}"
    syncer = WeightSyncer(WeightSyncConfig(transport=transport, bucket_mb=0.25), [engine.url], is_source=True,
                          run_dir=tmp_path)
    try:
        sync = syncer.push(actor.export_hf_weights(), version)
    finally:
        syncer.close()
    assert sync["weight_sync/mb"] > 0.5  # the whole model (~0.6 MB in fp32) went over

    samples = generate(engine.url, seed=2000)
    assert {s.weight_version for s in samples} == {version}
    parity = engine_vs_trainer(actor, samples)
    mean_lp = sum(sum(s.rollout_logprobs) for s in samples) / (len(samples) * NUM_NEW_TOKENS)
    print(f"{transport}: max |engine - trainer| logprob before sync {drift:.3e}, after {parity:.3e} "
          f"(mean logprob {mean_lp:.2f}, sync {sync['weight_sync/seconds']:.3f} s)")
    assert parity < PARITY_TOL, f"{transport}: max |engine - trainer| = {parity:.3e} after the sync"
