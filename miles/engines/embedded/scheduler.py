"""Request queue and the one worker thread that owns the model.

Everything that touches the model (loading, forward passes, weight updates, reading weights) runs
on the worker thread; the HTTP event loop only enqueues work and awaits futures, so /health stays
responsive while a collective blocks the worker.

Batching (continuous, at step boundaries): between two decode steps the worker admits every
waiting request that fits under max_batch_size. New rows are prefilled together, sample their
first token, and join the running batch (their KV cache is merged in, left-padded). Each step
feeds every row its last sampled token, samples the next one, and drops rows that finished;
a request's future resolves as soon as it finishes.

Control operations are closures run by the worker between steps:
- "immediate" ops (pause, continue, flush, read weights, destroy group) run at the next boundary;
- "writer" ops (weight updates) follow SGLang's model-update lock: when generation is not paused
  they wait until the running batch has drained and admit nothing meanwhile; when paused they
  run at once, between steps (in_place keeps the KV cache, so in-flight rows continue on it).
Pause modes: "abort" aborts everything in flight; "retract" moves running rows back to the waiting
queue (they are re-prefilled with prompt + tokens so far after continue, recomputing the KV cache
with the then-current weights); "in_place" freezes the running batch with its KV cache. While
paused, new requests wait in the queue; aborts are still applied.
"""

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from miles.engines.embedded.model_runner import Batch, ModelRunner
from miles.engines.embedded.sampling import RowSampler, SamplingParams, make_row_sampler, sample_rows

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")


@dataclass(eq=False)
class Request:
    """One generation request and, once finished, its result."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: dict | None = None
    weight_version: str = ""
    e2e_latency: float = 0.0
    abort_message: str | None = None
    """Set (by any thread) to ask the worker to abort this request."""
    sampler: RowSampler | None = None
    return_routed_experts: bool = False
    """Keep the top-k experts of every fed token (the engine must capture routing)."""
    routed_experts_start_len: int = 0
    """First position whose routing goes into the response."""
    routed_chunks: list = field(default_factory=list)
    """int32 [n, layers, top_k] tensors, in position order: the prefill's, then one per decode step."""


@dataclass(eq=False)
class _Op:
    fn: Callable[[], Any]
    writer: bool
    future: Future = field(default_factory=Future)


class Scheduler:
    """Owns the worker thread; all public methods are safe to call from any thread."""

    def __init__(self, load_runner: Callable[[], ModelRunner], max_batch_size: int = 64,
                 random_seed: int = 0, weight_version: str = "default"):
        self.max_batch_size = max_batch_size
        self.weight_version = weight_version
        self.runner: ModelRunner | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.num_requests_total = 0
        self.num_generated_tokens_total = 0
        self._load_runner = load_runner
        self._seeds = random.Random(random_seed)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._ops: deque[_Op] = deque()
        self._paused = False
        self._abort_dirty = False
        self._stopping = False
        self._admitting: list[Request] = []  # taken from the queue, being prefilled (read under the lock)
        self._rows: list[Request] = []  # worker-owned, aligned with self._batch rows
        self._pending: list[int] = []  # worker-owned: last sampled token of each row, not yet fed
        self._batch: Batch | None = None
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)

    # -- public API (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    @property
    def paused(self) -> bool:
        return self._paused

    def submit(self, req: Request) -> Future:
        """Queue a request; its future resolves with the finished Request."""
        req.future.set_running_or_notify_cancel()  # the caller may stop waiting; the future still resolves
        with self._cond:
            if self._stopping:
                raise RuntimeError("engine is shutting down")
            self.num_requests_total += 1
            self._waiting.append(req)
            self._cond.notify_all()
        return req.future

    def run_op(self, fn: Callable[[], Any], writer: bool = False) -> Future:
        """Run fn on the worker between steps (writer: under the model-update rule); future of its result."""
        op = _Op(fn=fn, writer=writer)
        op.future.set_running_or_notify_cancel()
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()
        return op.future

    def abort(self, rid: str | None = None, abort_all: bool = False, message: str = "Abort requested.") -> int:
        """Abort matching requests (waiting ones at once, running ones at the next step); return how many."""
        matched = 0
        with self._cond:
            for req in list(self._waiting):
                if abort_all or req.rid == rid:
                    self._waiting.remove(req)
                    req.abort_message = message
                    self._finish(req, {"type": "abort", "message": message})
                    matched += 1
            for req in self._admitting + self._rows:
                if (abort_all or req.rid == rid) and req.abort_message is None and req.finish_reason is None:
                    req.abort_message = message
                    matched += 1
            self._abort_dirty = self._abort_dirty or matched > 0
            self._cond.notify_all()
        return matched

    def abort_request(self, req: Request, message: str) -> None:
        """Abort one request object (client went away)."""
        with self._cond:
            if req in self._waiting:
                self._waiting.remove(req)
                self._finish(req, {"type": "abort", "message": message})
            elif req.finish_reason is None:
                req.abort_message = message
                self._abort_dirty = True
                self._cond.notify_all()

    def pause(self, mode: str) -> Future:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} is not one of {PAUSE_MODES}")
        return self.run_op(lambda: self._pause(mode))

    def resume(self) -> Future:
        return self.run_op(self._resume)

    def stats(self) -> dict:
        with self._cond:
            return {
                "num_requests_total": self.num_requests_total,
                "num_running_reqs": len(self._rows) + len(self._admitting),
                "num_waiting_reqs": len(self._waiting),
                "num_generated_tokens_total": self.num_generated_tokens_total,
            }

    # -- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.runner = self._load_runner()
        except BaseException as exc:  # process boundary of the worker: report, never hang silently
            logger.exception("model load failed")
            self.load_error = exc
            self._fail_all(RuntimeError(f"model load failed: {exc}"))
            return
        self.ready.set()
        while True:
            with self._cond:
                self._cond.wait_for(self._has_work)
                if self._stopping:
                    break
                ops = self._take_ops()
                admit = [] if ops else self._take_admissions()
                self._admitting = admit
                self._abort_dirty = False
            for op in ops:
                self._run_one_op(op)
            try:
                self._apply_aborts()
                if admit:
                    self._admit(admit)
                    with self._cond:
                        self._admitting = []
                if self._rows and not self._paused:
                    self._step()
            except Exception as exc:  # a forward pass failed: fail these requests, keep serving
                logger.exception("generation step failed; failing %d running requests", len(self._rows) + len(admit))
                for req in self._rows + [r for r in admit if r.finish_reason is None]:
                    if not req.future.done():
                        req.future.set_exception(exc)
                with self._cond:
                    self._rows, self._pending, self._batch, self._admitting = [], [], None, []
        self._fail_all(RuntimeError("engine stopped"))

    def _has_work(self) -> bool:
        if self._stopping or self._abort_dirty or any(not op.writer for op in self._ops):
            return True
        writer_pending = any(op.writer for op in self._ops)
        if writer_pending and (self._paused or not self._rows):
            return True
        if self._paused:
            return False
        return bool(self._rows) or (bool(self._waiting) and not writer_pending)

    def _take_ops(self) -> list[_Op]:
        writers_ok = self._paused or not self._rows
        ops = [op for op in self._ops if writers_ok or not op.writer]
        for op in ops:
            self._ops.remove(op)
        return ops

    def _take_admissions(self) -> list[Request]:
        if self._paused or any(op.writer for op in self._ops):
            return []
        admit = []
        while self._waiting and len(self._rows) + len(admit) < self.max_batch_size:
            admit.append(self._waiting.popleft())
        return admit

    def _run_one_op(self, op: _Op) -> None:
        try:
            result = op.fn()
        except Exception as exc:  # reported to the HTTP caller as a failed operation
            logger.warning("control operation failed: %s", exc)
            op.future.set_exception(exc)
        else:
            op.future.set_result(result)

    def _admit(self, reqs: list[Request]) -> None:
        runner = self.runner
        for req in reqs:
            if req.sampler is None:
                req.sampler = make_row_sampler(req.params, runner.eos_ids, self._seeds.getrandbits(63))
        todo = []
        for req in reqs:
            if req.params.max_new_tokens == 0:
                self._finish_locked(req, {"type": "length", "length": 0})
            else:
                todo.append(req)
        if not todo:
            return
        logger.debug("admitting %d request(s) into a running batch of %d", len(todo), len(self._rows))
        batch, logits_BV = runner.prefill([r.input_ids + r.output_ids for r in todo])
        for req, routed in zip(todo, runner.last_routed or ()):
            if req.return_routed_experts:  # a re-prefill (after retract) recomputes every position
                req.routed_chunks = [routed]
        tokens, keep = self._sample(todo, logits_BV)
        batch = runner.select(batch, keep)
        if batch is not None:
            self._batch = runner.merge(self._batch, batch)
            with self._cond:  # visible to abort() and stats() together with leaving _admitting
                self._rows = self._rows + [todo[i] for i in keep]
                self._admitting = []
            self._pending += [tokens[i] for i in keep]

    def _step(self) -> None:
        logits_BV = self.runner.decode(self._batch, self._pending)
        if self.runner.last_routed is not None:  # before sampling: finishing resolves the future
            for i, req in enumerate(self._rows):
                if req.return_routed_experts:
                    req.routed_chunks.append(self.runner.last_routed[i:i + 1])
        tokens, keep = self._sample(self._rows, logits_BV)
        self._keep(keep, tokens)

    def _keep(self, keep: list[int], tokens: list[int]) -> None:
        self._batch = self.runner.select(self._batch, keep) if self._batch is not None else None
        self._rows = [self._rows[i] for i in keep]
        self._pending = [tokens[i] for i in keep]

    def _sample(self, reqs: list[Request], logits_BV) -> tuple[list[int], list[int]]:
        """Sample one token per row, record it, finish rows that are done; return (tokens, kept rows)."""
        tokens, logprobs = sample_rows(logits_BV, [r.sampler for r in reqs], [len(r.output_ids) for r in reqs])
        context = self.runner.context_length
        keep = []
        for i, (req, tok, lp) in enumerate(zip(reqs, tokens, logprobs)):
            req.output_ids.append(tok)
            req.output_logprobs.append(lp)
            n = len(req.output_ids)
            if tok in req.sampler.stop_ids and n >= req.params.min_new_tokens:
                self._finish_locked(req, {"type": "stop", "matched": tok})
            elif n >= req.params.max_new_tokens or len(req.input_ids) + n >= context:
                self._finish_locked(req, {"type": "length", "length": n})
            else:
                keep.append(i)
        with self._cond:
            self.num_generated_tokens_total += len(reqs)
        return tokens, keep

    def _apply_aborts(self) -> None:
        if not any(r.abort_message is not None for r in self._rows):
            return
        keep = []
        for i, req in enumerate(self._rows):
            if req.abort_message is not None:
                self._finish_locked(req, {"type": "abort", "message": req.abort_message})
            else:
                keep.append(i)
        self._keep(keep, self._pending)

    def _pause(self, mode: str) -> str:
        if mode == "abort":
            self.abort(abort_all=True, message="Aborted by pause_generation.")
            self._apply_aborts()
        elif mode == "retract":
            with self._cond:
                self._waiting.extendleft(reversed(self._rows))
                self._rows, self._pending, self._batch = [], [], None
        with self._cond:
            self._paused = True
        return f"Generation paused (mode={mode})."

    def _resume(self) -> str:
        with self._cond:
            self._paused = False
        return "Generation continued."

    def _finish_locked(self, req: Request, reason: dict) -> None:
        with self._cond:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: dict) -> None:
        """Record the result and resolve the future; caller holds the lock."""
        req.finish_reason = reason
        req.weight_version = self.weight_version
        req.e2e_latency = time.monotonic() - req.created
        if not req.future.done():
            req.future.set_result(req)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            pending = list(self._waiting) + self._rows
            self._waiting.clear()
            ops = list(self._ops)
            self._ops.clear()
        for item in pending + ops:
            if not item.future.done():
                item.future.set_exception(exc)
