"""Trainer-side weight sender over a torch.distributed broadcast group (SGLang's distributed path).

    sender = DistributedWeightSender(["http://e0:30000", "http://e1:30000"], "10.0.0.5", 29600)
    sender.connect()                                  # trainer = rank 0, engine i = rank 1 + i
    stats = sender.send(hf_named_tensors, weight_version="step-12")
    sender.close()

Protocol, per bucket: POST /update_weights_from_distributed {names, dtypes, shapes, ...} to every
engine (concurrently, from a background asyncio thread) while this thread broadcasts the tensors
from rank 0 in the same order. The engines allocate, receive and copy into their models. With
load_format="flattened_bucket" a bucket is one broadcast of `torch.cat` of the flattened tensors
(SGLang's FlattenedTensorBucket layout; all tensors of a bucket should share a dtype).
weight_version is sent with the last bucket only, so engines report it once all weights landed.

A failed update leaves an engine's weights partly written (SGLang says so too): on any error,
treat the engines' weights as invalid and redo the full sync (or restart them). With NCCL,
set NCCL_CUMEM_ENABLE=0 in the trainer process (see docs on weight sync with SGLang).
"""

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from miles.engines.client import EngineClient, EngineError
from miles.weight_sync.process_group import destroy_custom_process_group, init_custom_process_group

logger = logging.getLogger(__name__)

LOAD_FORMATS = (None, "flattened_bucket")


@dataclass(frozen=True)
class SendStats:
    """What one `send` moved."""

    num_tensors: int
    """Tensors broadcast."""
    num_buckets: int
    """HTTP update calls per engine."""
    num_bytes: int
    """Payload bytes broadcast."""
    seconds: float
    """Wall time of the whole send."""


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors in order into buckets of at most bucket_bytes (a bigger tensor gets its own)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


async def _post_checked(client: EngineClient, path: str, payload: dict) -> dict:
    """POST a weight endpoint; raise EngineError unless it answers {"success": true}."""
    answer = await client.request("POST", path, payload)
    if not isinstance(answer, dict) or not answer.get("success", False):
        raise EngineError(client.base_url + path, 200, str(answer))
    return answer


class DistributedWeightSender:
    """Rank 0 of a weight-update group with every engine; a synchronous API for trainer code."""

    def __init__(self, engine_urls: list[str], master_address: str, master_port: int, backend: str = "gloo",
                 group_name: str = "weight_update_group", timeout_s: float = 1800.0):
        if not engine_urls:
            raise ValueError("DistributedWeightSender needs at least one engine URL")
        self.engine_urls = list(engine_urls)
        self.master_address, self.master_port = master_address, int(master_port)
        self.backend, self.group_name, self.timeout_s = backend, group_name, timeout_s
        self.world_size = 1 + len(self.engine_urls)
        self._pg: dist.ProcessGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._clients: list[EngineClient] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def connect(self) -> None:
        """Ask every engine to join (rank 1 + i) while joining as rank 0; both sides block until all joined."""
        if self._pg is not None:
            raise RuntimeError("already connected")
        self._start_loop()
        calls = [
            self._submit(c.init_weights_update_group(self.master_address, self.master_port, 1 + i, self.world_size,
                                                     self.group_name, self.backend))
            for i, c in enumerate(self._clients)
        ]
        join: Future = Future()

        def _join() -> None:
            try:
                join.set_result(init_custom_process_group(
                    self.backend, f"tcp://{self.master_address}:{self.master_port}", self.world_size, 0,
                    self.group_name, timedelta(seconds=self.timeout_s),
                ))
            except BaseException as exc:  # handed to the caller through the future
                join.set_exception(exc)

        # The join runs in a daemon thread so that an engine refusing the group fails fast here
        # instead of leaving this thread in the rendezvous until the timeout.
        threading.Thread(target=_join, name="weight-sender-join", daemon=True).start()
        done, _ = wait([join, *calls], return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            for f in calls:
                f.cancel()
            self._stop_loop()
            raise failed[0]
        self._pg = join.result()
        for f in calls:
            f.result()
        logger.info("weight update group %r ready: %d engine(s), backend %s",
                    self.group_name, len(self.engine_urls), self.backend)

    def close(self) -> None:
        """Destroy the group on the engines and here, and stop the HTTP thread."""
        try:
            if self._pg is not None:
                calls = [self._submit(c.destroy_weights_update_group(self.group_name)) for c in self._clients]
                destroy_custom_process_group(self._pg)
                self._pg = None
                for f in calls:
                    f.result()
        finally:
            self._stop_loop()

    def __enter__(self) -> "DistributedWeightSender":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending ---------------------------------------------------------------------------------
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str,
             bucket_bytes: int = 512 << 20, load_format: str | None = None, flush_cache: bool = True) -> SendStats:
        """Broadcast all tensors (HF names) to every engine, bucket by bucket; raise EngineError on a refusal."""
        if self._pg is None:
            raise RuntimeError("call connect() before send()")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {load_format!r} is not one of {LOAD_FORMATS}")
        t0 = time.perf_counter()
        num_tensors = num_buckets = num_bytes = 0
        buckets = iter_buckets(named_tensors, bucket_bytes)
        bucket = next(buckets, None)
        while bucket is not None:
            following = next(buckets, None)
            version = weight_version if following is None else None
            num_bytes += self._send_bucket(bucket, version, load_format, flush_cache)
            num_tensors += len(bucket)
            num_buckets += 1
            bucket = following
        stats = SendStats(num_tensors, num_buckets, num_bytes, time.perf_counter() - t0)
        logger.info("sent %d tensors (%.1f MB) in %d bucket(s) to %d engine(s) in %.3f s, weight_version %s",
                    num_tensors, num_bytes / 1e6, num_buckets, len(self.engine_urls), stats.seconds, weight_version)
        return stats

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], weight_version: str | None,
                     load_format: str | None, flush_cache: bool) -> int:
        payload = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.group_name, "weight_version": weight_version,
            "flush_cache": flush_cache, "load_format": load_format,
        }
        calls = [self._submit(_post_checked(c, "/update_weights_from_distributed", payload)) for c in self._clients]
        tensors = [self._for_backend(t) for _, t in bucket]
        if load_format == "flattened_bucket":
            tensors = [torch.cat([t.flatten() for t in tensors])]
        for t in tensors:
            dist.broadcast(t, src=0, group=self._pg)
        for f in calls:
            f.result()
        return sum(t.numel() * t.element_size() for t in tensors)

    def _for_backend(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.backend == "gloo" and t.device.type != "cpu":
            t = t.cpu()
        return t.contiguous()

    # -- background HTTP loop --------------------------------------------------------------------
    def _start_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="weight-sender-http", daemon=True)
        self._thread.start()
        self._clients = [EngineClient(u, timeout_s=self.timeout_s) for u in self.engine_urls]

    def _submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _stop_loop(self) -> None:
        if self._loop is None:
            return
        for c in self._clients:
            self._submit(c.close()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop, self._thread, self._clients = None, None, []
