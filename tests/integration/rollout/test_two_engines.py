"""Two embedded engines + the router, as real processes: spread, and surviving an engine crash."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from transformers import AutoTokenizer

from miles.engines.config import RouterConfig
from miles.engines.process import launch_embedded_engine, launch_router
from miles.reward.builtin import exact_match
from miles.rollout.client import RolloutClient
from miles.rollout.config import RolloutConfig
from miles.rollout.data_source import JsonlPromptSource
from miles.rollout.filters import drop_zero_std_groups
from miles.rollout.sample import SampleStatus

pytestmark = pytest.mark.slow
ENGINE_START_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workers_by_url(router_url: str) -> dict[str, dict]:
    return {w["url"]: w for w in requests.get(router_url + "/workers", timeout=10).json()["workers"]}


def engine_requests_total(url: str) -> int:
    return requests.get(url + "/server_info", timeout=30).json()["internal_states"][0]["num_requests_total"]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    """Engines A and B and a router in front of them; everything stopped afterwards."""
    logs = tmp_path_factory.mktemp("two_engines")
    procs = []
    try:
        engines = [launch_embedded_engine(tiny_model, "127.0.0.1", free_port(), logs / f"engine{i}.log",
                                          extra_args=("--random-seed", str(i))) for i in range(2)]
        procs += engines
        router_cfg = RouterConfig(health_check_interval_s=0.5, health_check_failure_threshold=2, max_retries=3)
        router = launch_router("127.0.0.1", free_port(), [e.url for e in engines], logs / "router.log", router_cfg)
        procs.append(router)
        for engine in engines:
            engine.wait_healthy(ENGINE_START_S)
        wait_for(lambda: sum(w["is_healthy"] for w in workers_by_url(router.url).values()) == 2, 30, "router to admit both")
        yield {"engines": engines, "router": router, "logs": logs}
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def prompts(tokenizer, tmp_path, num: int):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}", "label": str(2 * i)}) + "\n" for i in range(num)))
    return JsonlPromptSource(path, tokenizer=tokenizer, apply_chat_template=True, seed=0).next_prompts(num)


def rollout_client(router_url: str, tokenizer, max_new_tokens: int) -> RolloutClient:
    cfg = RolloutConfig(n_samples_per_prompt=4, max_new_tokens=max_new_tokens, concurrency=64, request_retries=2)
    return RolloutClient(router_url, cfg, exact_match, tokenizer, eos_token_ids=[tokenizer.eos_token_id], seed=0)


def check_samples(batch, num_groups: int, max_new_tokens: int, eos: int) -> None:
    assert [g[0].group_id for g in batch.groups] == list(range(num_groups))
    assert all([s.index for s in g] == [0, 1, 2, 3] for g in batch.groups)
    for s in batch.samples:
        assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED), (s.sample_id, s.status)
        n = len(s.response_tokens)
        assert 1 <= n <= max_new_tokens and len(s.rollout_logprobs) == len(s.loss_mask) == n
        assert all(lp <= 0.0 for lp in s.rollout_logprobs)
        assert eos not in s.response_tokens[:-1]  # generation stops at the first EOS
        assert s.status != SampleStatus.COMPLETED or s.response_tokens[-1] == eos
        assert s.status != SampleStatus.TRUNCATED or n == max_new_tokens
        assert s.reward in (0.0, 1.0)


def test_64_concurrent_requests_spread_over_both_engines(cluster, tokenizer, tmp_path):
    engines, router = cluster["engines"], cluster["router"]
    engines_before = [engine_requests_total(e.url) for e in engines]
    router_before = workers_by_url(router.url)

    batch = rollout_client(router.url, tokenizer, 16).generate_sync(prompts(tokenizer, tmp_path, 16))

    assert len(batch.groups) == 16 and len(batch.samples) == 64 and batch.dropped == {}
    check_samples(batch, 16, 16, tokenizer.eos_token_id)
    served = [engine_requests_total(e.url) - before for e, before in zip(engines, engines_before)]
    assert sum(served) == 64 and min(served) >= 16, served
    view = workers_by_url(router.url)
    routed = [view[e.url]["num_requests_total"] - router_before[e.url]["num_requests_total"] for e in engines]
    assert routed == served
    truncated = sum(s.status == SampleStatus.TRUNCATED for s in batch.samples) / 64
    assert batch.metrics["rollout/truncated_frac"] == pytest.approx(truncated)
    assert batch.metrics["rollout/response_len_mean"] == pytest.approx(sum(len(s.response_tokens) for s in batch.samples) / 64)


def odd_length_reward(inp) -> float:
    """A reward with spread under a random model: 1.0 for an odd-length response text."""
    return float(len(inp.response) % 2)


def test_seeded_rollout_repeats_and_filter_drops_flat_groups(cluster, tokenizer, tmp_path):
    router = cluster["router"]
    cfg = RolloutConfig(n_samples_per_prompt=4, max_new_tokens=8, concurrency=64)
    items = prompts(tokenizer, tmp_path, 8)
    runs = [RolloutClient(router.url, cfg, odd_length_reward, tokenizer, [tokenizer.eos_token_id], drop_zero_std_groups, seed=11)
            .generate_sync(items) for _ in range(2)]
    # Per-sample seeds derive from (seed, group, index): the same tokens whichever engine serves.
    assert [s.response_tokens for s in runs[0].samples] == [s.response_tokens for s in runs[1].samples]
    batch = runs[0]
    assert len(batch.groups) + batch.dropped.get("zero_std", 0) == 8 and set(batch.dropped) <= {"zero_std"}
    assert batch.metrics["rollout/groups_dropped"] == 8 - len(batch.groups)
    assert all(len({s.reward for s in g}) > 1 for g in batch.groups)
    other_seed = RolloutClient(router.url, cfg, odd_length_reward, tokenizer, [tokenizer.eos_token_id], seed=12).generate_sync(items)
    assert [s.response_tokens for s in other_seed.samples] != [s.response_tokens for s in batch.samples]


def test_rollout_survives_engine_killed_mid_rollout(cluster, tokenizer, tmp_path, tiny_model):
    engines, router = cluster["engines"], cluster["router"]
    victim = launch_embedded_engine(tiny_model, "127.0.0.1", free_port(), cluster["logs"] / "victim.log",
                                    extra_args=("--random-seed", "7"))
    try:
        victim.wait_healthy(ENGINE_START_S)
        assert requests.post(router.url + "/workers", json={"url": victim.url}, timeout=10).status_code == 202
        wait_for(lambda: workers_by_url(router.url).get(victim.url, {}).get("is_healthy"), 30, "victim admitted")
        before = workers_by_url(router.url)
        max_new_tokens = 48
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(rollout_client(router.url, tokenizer, max_new_tokens).generate_sync, prompts(tokenizer, tmp_path, 16))
            wait_for(lambda: workers_by_url(router.url)[victim.url]["load"] >= 4, 60, "requests in flight on the victim")
            victim.kill()  # SIGKILL by PID: a crash
            batch = future.result(timeout=120)
    finally:
        victim.stop()

    assert len(batch.samples) == 64
    check_samples(batch, 16, max_new_tokens, tokenizer.eos_token_id)
    view = workers_by_url(router.url)
    assert view[victim.url]["is_healthy"] is False
    assert view[victim.url]["num_transport_failures"] >= 1
    survivors = sum(view[e.url]["num_requests_total"] - before[e.url]["num_requests_total"] for e in engines)
    victim_answered = view[victim.url]["num_requests_total"] - before[victim.url]["num_requests_total"]
    assert survivors == 64 - victim_answered and victim_answered < 64  # the survivors served the rest
