"""Real SGLang /generate logprobs vs our Megatron trainer's logprobs on the same weights.

SGLang (bf16, GPU 1) samples 8 prompts x 32 tokens at temperature 0.8 from the tiny Qwen3; the
Megatron actor (GPU 0) recomputes log_softmax(logits / T) of the same tokens in bf16 and in fp32,
and HF transformers in fp32 gives a third opinion. Reported: mean / max |engine - trainer|. The
bounds are loose multiples of bf16 rounding (tokens of this near-uniform tiny model have
logprobs near -6.2); a wrong temperature or a broken weight load is off by > 0.1 everywhere.
"""

import pytest

from miles.algo.config import AlgoConfig
from miles.trainer.actor import MegatronActor
from miles.trainer.config import TrainerConfig

from .conftest import free_cuda, generate_samples, hf_logprobs, mismatch

pytestmark = pytest.mark.gpu(count=2)

TEMPERATURE = 0.8
NUM_NEW_TOKENS = 32
PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302], [42], [1, 3, 4, 5, 6, 7, 8], [77, 78], [8],
           [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71]]
BF16_MEAN_TOL = 2e-2
BF16_MAX_TOL = 0.15


def test_sglang_logprobs_match_megatron(engine_slot, dense_model, trainer_parallel, record):
    engine = engine_slot.start(dense_model)
    samples = generate_samples(engine.url, PROMPTS, NUM_NEW_TOKENS, TEMPERATURE)
    device = str(trainer_parallel.device)
    numbers = {}
    for name, bf16 in (("megatron_bf16", True), ("megatron_fp32", False)):
        actor = MegatronActor(str(dense_model), TrainerConfig(bf16=bf16, micro_batch_size=len(PROMPTS)), AlgoConfig(),
                              trainer_parallel)
        numbers[name] = mismatch(samples, actor.compute_logprobs(samples, TEMPERATURE))
        del actor
        free_cuda()
    numbers["hf_fp32"] = mismatch(samples, hf_logprobs(dense_model, samples, TEMPERATURE, device))
    record("sglang_vs_trainer_logprobs", {"temperature": TEMPERATURE, **numbers})

    assert -7.5 < numbers["hf_fp32"]["mean_engine_logprob"] < -5.0  # vocab 512, near-uniform: about -ln 512
    for name, m in numbers.items():
        assert m["num_tokens"] == len(PROMPTS) * NUM_NEW_TOKENS
        assert m["mean_abs"] < BF16_MEAN_TOL and m["max_abs"] < BF16_MAX_TOL, f"{name}: {m}"
