"""RolloutClient without engines: payload, response parsing, metrics, and loud failures."""

import asyncio
import socket

import pytest
from transformers import AutoTokenizer

from miles.errors import ConfigError
from miles.reward.builtin import exact_match
from miles.rollout.client import RolloutClient, RolloutError, rollout_metrics, sampling_seed
from miles.rollout.config import RolloutConfig
from miles.rollout.data_source import PromptItem
from miles.rollout.sample import Sample, SampleStatus

CFG = RolloutConfig(n_samples_per_prompt=2, max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, request_retries=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def client(tokenizer, url="http://127.0.0.1:1", cfg=CFG, seed=5):
    return RolloutClient(url, cfg, exact_match, tokenizer, eos_token_ids=[2], seed=seed)


def test_payload(tokenizer):
    sample = Sample(group_id=3, index=1, prompt_tokens=[10, 11])
    payload = client(tokenizer).payload(sample)
    assert payload == {
        "input_ids": [10, 11],
        "sampling_params": {
            "max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "stop_token_ids": [2],
            "no_stop_trim": True, "skip_special_tokens": False, "sampling_seed": sampling_seed(5, 3, 1),
        },
        "return_logprob": True,
        "rid": "3-1",
    }


def test_sampling_seed_is_deterministic_and_distinct():
    seeds = {sampling_seed(0, g, i) for g in range(50) for i in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**31 for s in seeds)
    assert sampling_seed(1, 2, 3) == sampling_seed(1, 2, 3) != sampling_seed(2, 2, 3)


def test_fill_from_sglang_answer(tokenizer):
    ids = tokenizer.encode("42") + [2]
    answer = {
        "text": "ignored", "output_ids": ids,
        "meta_info": {"finish_reason": {"type": "stop", "matched": 2}, "weight_version": "step-3",
                      "output_token_logprobs": [[-0.5 - i, t, None] for i, t in enumerate(ids)]},
    }
    sample = Sample(group_id=0, index=0, prompt_tokens=[1])
    client(tokenizer)._fill(sample, answer)
    assert sample.response_tokens == ids
    assert sample.rollout_logprobs == [-0.5 - i for i in range(len(ids))]
    assert sample.loss_mask == [1] * len(ids)
    assert (sample.status, sample.weight_version, sample.response_text) == (SampleStatus.COMPLETED, "step-3", "42")
    for finish, status in (({"type": "length", "length": 8}, SampleStatus.TRUNCATED), ({"type": "abort"}, SampleStatus.ABORTED)):
        answer["meta_info"]["finish_reason"] = finish
        client(tokenizer)._fill(sample, answer)
        assert sample.status == status
    answer["meta_info"]["finish_reason"] = None
    with pytest.raises(RolloutError, match="unknown finish_reason None"):
        client(tokenizer)._fill(sample, answer)
    answer["meta_info"]["finish_reason"] = {"type": "stop"}
    answer["output_ids"] = ids[:-1]
    with pytest.raises(RolloutError, match="disagree"):
        client(tokenizer)._fill(sample, answer)


def test_metrics():
    def s(reward, n, status):
        return Sample(group_id=0, index=0, prompt_tokens=[1], response_tokens=[7] * n, reward=reward, status=status)

    samples = [s(1.0, 4, SampleStatus.COMPLETED), s(0.0, 8, SampleStatus.TRUNCATED),
               s(0.0, 2, SampleStatus.ABORTED), s(1.0, 6, SampleStatus.TRUNCATED)]
    m = rollout_metrics(samples, groups_dropped=3, seconds=1.5)
    assert m == {"rollout/reward_mean": 0.5, "rollout/reward_std": 0.5, "rollout/response_len_mean": 5.0,
                 "rollout/truncated_frac": 0.5, "rollout/aborted_frac": 0.25, "rollout/groups_dropped": 3.0,
                 "rollout/seconds": 1.5}


def test_needs_group_size(tokenizer):
    with pytest.raises(ConfigError, match="n_samples_per_prompt must be set"):
        client(tokenizer, cfg=RolloutConfig())


def test_unreachable_router_fails_loudly(tokenizer):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        prompts = [PromptItem(group_id=0, prompt="p", prompt_tokens=[5, 6])]
        with pytest.raises(RolloutError) as err:
            client(tokenizer, url=url).generate_sync(prompts)
    msg = str(err.value)
    assert f"/generate via router {url} failed 2 times" in msg and "sample 0-" in msg


def test_generate_sync_refuses_running_loop(tokenizer):
    async def inside():
        client(tokenizer).generate_sync([])

    with pytest.raises(RuntimeError, match="inside a running event loop"):
        asyncio.run(inside())
