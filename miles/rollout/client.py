"""`RolloutClient`: prompts → scored, filtered sample groups, through the router.

One /generate request per sample (n_samples_per_prompt per prompt), at most rollout.concurrency in
flight. Each response becomes a `Sample` (tokens, engine logprobs, status from finish_reason, weight
version), is scored by the reward function, and each finished group goes through the dynamic filter.

R3: `generate(prompts, routing_sink=...)` asks the engines for the routed experts of every sample
(`return_routed_experts`), decodes each answer's int32 [prompt + response - 1, layers, top_k] as it
arrives and hands it to the sink (the step's node-local dump writer), which returns the reference
stored in `Sample.routed_experts_ref`; the arrays never stay in the samples.

Failures are loud: a request that still fails at the transport level after rollout.request_retries
retries (or that the engine rejects with an HTTP error) raises `RolloutError` naming the router, so
the trainer never silently trains on a partial batch. Aborted generations are not failures; they come
back with status ABORTED for the filter (e.g. drop_aborted_groups) to handle.
"""

import asyncio
import hashlib
import logging
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import numpy as np

from miles.engines.client import EngineClient, EngineError, EngineUnreachable
from miles.errors import ConfigError
from miles.reward.types import RewardFn, RewardInput
from miles.rollout.config import RolloutConfig
from miles.rollout.data_source import PromptItem
from miles.rollout.sample import Sample, SampleStatus
from miles.rollout.types import DynamicFilter, FilterInput

logger = logging.getLogger(__name__)

RETRY_BACKOFF_S = 0.5
"""First retry waits this long; each later one twice as long (capped at 8 s)."""
_FINISH_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}


class RolloutError(RuntimeError):
    """Generation failed for good (after retries); the message names the router and the sample."""


class RoutingSink(Protocol):
    """Where R3 routing goes (miles.routing.dump_store.RoutingDumpWriter)."""

    num_layers: int
    top_k: int

    def add(self, sample_id: str, experts_TLK: np.ndarray) -> str:
        """Store one sample's routing; return its reference."""


@dataclass(frozen=True)
class RolloutBatch:
    """The result of one rollout call."""

    groups: list[list[Sample]]
    """Kept groups in group_id order; each holds n_samples_per_prompt samples in index order."""
    dropped: dict[str, int]
    """Groups dropped by the dynamic filter, by reason."""
    metrics: dict[str, float]
    """rollout/* metrics over every generated sample (kept or dropped)."""
    dropped_groups: list[list[Sample]] = field(default_factory=list)
    """The groups the dynamic filter dropped (for padding when over-sampling runs out of rounds)."""

    @property
    def samples(self) -> list[Sample]:
        """All kept samples, group by group."""
        return [s for group in self.groups for s in group]


def sampling_seed(seed: int, group_id: int, index: int) -> int:
    """Per-sample sampling seed, a pure function of (run seed, group, index): reruns sample the same."""
    digest = hashlib.sha256(f"{seed}/{group_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class RolloutClient:
    """Async rollout through one router URL (SGLang-API)."""

    def __init__(
        self, router_url: str, cfg: RolloutConfig, reward_fn: RewardFn, tokenizer, eos_token_ids: list[int],
        dynamic_filter: DynamicFilter | None = None, seed: int = 0, request_timeout_s: float = 3600.0,
        progress: bool = False,
    ):
        if cfg.n_samples_per_prompt is None:
            raise ConfigError("rollout.n_samples_per_prompt must be set (or derived from the batch invariant)")
        self.router_url = router_url.rstrip("/")
        self.cfg = cfg
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.dynamic_filter = dynamic_filter
        self.seed = seed
        self.request_timeout_s = request_timeout_s
        self._reward_seconds = 0.0
        self.progress = progress
        self._bar = None
        self._routing_sink: RoutingSink | None = None

    def payload(self, sample: Sample) -> dict:
        """The /generate body for one sample."""
        cfg = self.cfg
        return {
            "input_ids": sample.prompt_tokens,
            "sampling_params": {
                "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "top_k": cfg.top_k, "stop_token_ids": self.eos_token_ids, "no_stop_trim": True,
                "skip_special_tokens": False, "sampling_seed": sampling_seed(self.seed, sample.group_id, sample.index),
            },
            "return_logprob": True,
            "rid": sample.sample_id,
            **({"return_routed_experts": True} if self._routing_sink is not None else {}),
        }

    async def generate(self, prompts: list[PromptItem], routing_sink: RoutingSink | None = None) -> RolloutBatch:
        """Generate, score and filter n_samples_per_prompt responses for every prompt (with R3:
        every sample's routing goes to `routing_sink`)."""
        from tqdm import tqdm

        self._routing_sink = routing_sink
        start = time.perf_counter()
        self._reward_seconds = 0.0
        self._bar = tqdm(total=len(prompts) * self.cfg.n_samples_per_prompt, desc="rollout", unit="sample",
                         leave=False, disable=not self.progress)
        semaphore = asyncio.Semaphore(self.cfg.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency)
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                client = EngineClient(self.router_url, session=session)
                tasks = [asyncio.ensure_future(self._generate_group(client, semaphore, p)) for p in prompts]
                try:
                    groups = await asyncio.gather(*tasks)
                except BaseException:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise
        finally:
            self._bar.close()
        return self._filter(sorted(groups, key=lambda g: g[0].group_id), time.perf_counter() - start)

    def generate_sync(self, prompts: list[PromptItem], routing_sink: RoutingSink | None = None) -> RolloutBatch:
        """Blocking `generate`, for scripts (not from inside a running event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.generate(prompts, routing_sink))
        raise RuntimeError("generate_sync() called inside a running event loop; use `await generate()`")

    async def _generate_group(self, client: EngineClient, semaphore: asyncio.Semaphore, item: PromptItem) -> list[Sample]:
        samples = [
            Sample(group_id=item.group_id, index=i, prompt_tokens=list(item.prompt_tokens), prompt=item.prompt,
                   label=item.label, metadata=dict(item.metadata))
            for i in range(self.cfg.n_samples_per_prompt)
        ]
        await asyncio.gather(*(self._generate_sample(client, semaphore, s) for s in samples))
        return samples

    async def _generate_sample(self, client: EngineClient, semaphore: asyncio.Semaphore, sample: Sample) -> None:
        answer = await self._post(client, semaphore, sample)
        self._fill(sample, answer)
        start = time.perf_counter()
        reward = self.reward_fn(RewardInput(prompt=sample.prompt, response=sample.response_text,
                                            label=sample.label, metadata=sample.metadata))
        self._reward_seconds += time.perf_counter() - start
        sample.reward = float(reward)
        self._bar.update(1)

    async def _post(self, client: EngineClient, semaphore: asyncio.Semaphore, sample: Sample) -> dict:
        """POST /generate, retrying transport failures and 503 (router has no healthy engine right now)."""
        payload = self.payload(sample)
        retries = self.cfg.request_retries
        for attempt in range(retries + 1):
            try:
                async with semaphore:
                    return await client.generate(payload)
            except EngineUnreachable as exc:
                last: Exception = exc
            except EngineError as exc:
                if exc.status != 503:
                    sample.status = SampleStatus.FAILED
                    raise RolloutError(f"sample {sample.sample_id}: the engine rejected /generate via router {self.router_url}: {exc}") from exc
                last = exc
            if attempt < retries:
                delay = min(RETRY_BACKOFF_S * 2**attempt, 8.0)
                logger.warning("sample %s: %s; retry %d/%d in %.1f s", sample.sample_id, last, attempt + 1, retries, delay)
                await asyncio.sleep(delay)
        sample.status = SampleStatus.FAILED
        raise RolloutError(
            f"sample {sample.sample_id}: /generate via router {self.router_url} failed {retries + 1} times; last error: {last}"
        ) from last

    def _fill(self, sample: Sample, answer) -> None:
        """Copy one /generate answer into the sample."""
        where = f"/generate via router {self.router_url} for sample {sample.sample_id}"
        if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
            raise RolloutError(f"{where}: expected a JSON object with meta_info, got {str(answer)[:200]}")
        meta = answer["meta_info"]
        entries = meta.get("output_token_logprobs")
        if entries is None:
            raise RolloutError(f"{where}: meta_info has no output_token_logprobs (return_logprob ignored?)")
        tokens = [int(e[1]) for e in entries]
        output_ids = answer.get("output_ids")
        if output_ids is not None and list(output_ids) != tokens:
            raise RolloutError(f"{where}: output_ids ({len(output_ids)}) disagree with output_token_logprobs ({len(tokens)})")
        finish = meta.get("finish_reason")
        finish_type = finish.get("type") if isinstance(finish, dict) else finish
        if finish_type not in _FINISH_STATUS:
            raise RolloutError(f"{where}: unknown finish_reason {finish!r}")
        sample.response_tokens = tokens
        sample.rollout_logprobs = [float(e[0]) for e in entries]
        sample.loss_mask = [1] * len(tokens)
        sample.status = _FINISH_STATUS[finish_type]
        sample.weight_version = str(meta.get("weight_version", ""))
        # Special tokens (EOS) are kept in the tokens but not in the text the reward function reads.
        sample.response_text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self._routing_sink is not None:
            sample.routed_experts_ref = self._store_routing(sample, meta, where)

    def _store_routing(self, sample: Sample, meta: dict, where: str) -> str:
        """Decode the answer's routed experts and hand them to the sink; their reference."""
        from miles.engines.sglang import decode_routed_experts

        sink = self._routing_sink
        try:
            experts_TLK = decode_routed_experts(meta, sink.num_layers, sink.top_k)
        except ValueError as exc:
            raise RolloutError(f"{where}: {exc}") from exc
        expected = len(sample.prompt_tokens) + len(sample.response_tokens) - 1
        if experts_TLK.shape[0] != expected:
            raise RolloutError(f"{where}: routed_experts covers {experts_TLK.shape[0]} positions, expected "
                               f"{expected} (prompt + response - 1)")
        return sink.add(sample.sample_id, experts_TLK)

    def _filter(self, groups: list[list[Sample]], seconds: float) -> RolloutBatch:
        kept, dropped, dropped_groups = [], Counter(), []
        for group in groups:
            if self.dynamic_filter is None:
                kept.append(group)
                continue
            verdict = self.dynamic_filter(FilterInput(group=tuple(group)))
            if verdict.keep:
                kept.append(group)
            else:
                dropped[verdict.reason or "filtered"] += 1
                dropped_groups.append(group)
        samples = [s for g in groups for s in g]
        metrics = rollout_metrics(samples, sum(dropped.values()), seconds)
        metrics["rollout/groups_kept"] = float(len(kept))
        metrics["rollout/reward_seconds"] = self._reward_seconds
        logger.info("rollout: %d samples in %.1f s, reward mean %.3f, kept %d/%d groups",
                    len(samples), seconds, metrics["rollout/reward_mean"], len(kept), len(groups))
        return RolloutBatch(groups=kept, dropped=dict(dropped), metrics=metrics, dropped_groups=dropped_groups)


def rollout_metrics(samples: list[Sample], groups_dropped: int, seconds: float) -> dict[str, float]:
    """rollout/* metrics over samples (rewards set)."""
    num = max(len(samples), 1)
    rewards = [s.reward for s in samples]
    return {
        "rollout/reward_mean": statistics.fmean(rewards) if rewards else 0.0,
        "rollout/reward_std": statistics.pstdev(rewards) if rewards else 0.0,
        "rollout/response_len_mean": sum(len(s.response_tokens) for s in samples) / num,
        "rollout/truncated_frac": sum(s.status == SampleStatus.TRUNCATED for s in samples) / num,
        "rollout/aborted_frac": sum(s.status == SampleStatus.ABORTED for s in samples) / num,
        "rollout/groups_dropped": float(groups_dropped),
        "rollout/seconds": seconds,
    }
