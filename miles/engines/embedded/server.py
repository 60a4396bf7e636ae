"""aiohttp app of the embedded engine: SGLang's native HTTP API, the subset RL loops use.

JSON shapes follow SGLang 0.5.x (`sglang/srt/entrypoints/http_server.py`), so `EngineClient`
cannot tell the two apart. Handlers never touch the model: they parse, enqueue on the `Scheduler`
and await. Errors: /generate answers 400 `{"error": {"message": ...}}`; weight endpoints answer
`{"success": false, "message": ...}` with 400. Until the model is loaded, /health and the
endpoints that need the model answer 503.
"""

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

import miles
from miles.engines.embedded.model_runner import ModelRunner, load_tokenizer
from miles.engines.embedded.protocol import BadRequest, format_response, parse_generate
from miles.engines.embedded.sampling import SamplingParams
from miles.engines.embedded.scheduler import Request, Scheduler
from miles.engines.embedded.update_groups import UpdateGroups
from miles.engines.embedded.weights import WeightLoader, read_safetensors_dir

logger = logging.getLogger(__name__)

HEALTH_GENERATE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class EngineArgs:
    """How one embedded engine serves (the CLI flags of `python -m miles.engines.embedded`)."""

    model_path: str
    """Folder of a Hugging Face checkpoint (config, safetensors, tokenizer); read locally only."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 30000
    """Port to bind."""
    dtype: str = "float32"
    """Weights and compute dtype: float32, bfloat16 or float16."""
    max_batch_size: int = 64
    """Most requests decoded together."""
    random_seed: int = 0
    """Seeds the per-request seeds of requests that carry none."""
    weight_version: str = "default"
    """Initial weight_version reported in meta_info."""
    num_threads: int = 0
    """torch intra-op threads of the worker; 0 = torch's default (one per core). Use fewer on cores shared
    with other processes: OpenMP threads then stall each other (10-30x slower decode, measured)."""
    enable_return_routed_experts: bool = False
    """Capture each token's top-k experts (MoE checkpoints only) so requests may ask for them."""
    router_selection_noise: float = 0.0
    """Study knob: perturb the routers' top-k choice (not their weights) by this relative scale."""


class EngineState:
    """Everything the handlers share; `loader` and `tokenizer` appear once the worker loaded the model."""

    def __init__(self, args: EngineArgs):
        self.args = args
        self.started = time.time()
        self.tokenizer = None
        self.num_threads: int | None = None
        self.loader: WeightLoader | None = None
        self.groups = UpdateGroups()
        self.scheduler = Scheduler(self._load, args.max_batch_size, args.random_seed, args.weight_version)

    def _load(self) -> ModelRunner:
        """Runs on the worker thread (thread settings of torch are per thread, so they are made here)."""
        import torch

        if self.args.num_threads > 0:
            torch.set_num_threads(self.args.num_threads)
        self.num_threads = torch.get_num_threads()
        runner = ModelRunner(self.args.model_path, self.args.dtype, self.args.enable_return_routed_experts,
                             self.args.router_selection_noise)
        self.tokenizer = load_tokenizer(self.args.model_path)
        self.loader = WeightLoader(runner.model)
        return runner

    @property
    def ready(self) -> bool:
        return self.scheduler.ready.is_set()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def _not_ready() -> web.Response:
    return _error(503, "the engine is still loading the model")


async def _body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _state(request: web.Request) -> EngineState:
    return request.app["state"]


# -- generation ----------------------------------------------------------------------------------
async def generate(request: web.Request) -> web.Response:
    state = _state(request)
    if not state.ready:
        return _not_ready()
    try:
        body = await _body(request)
        runner = state.scheduler.runner
        reqs, is_batch = parse_generate(body, state.tokenizer, runner.context_length, runner.model.config.vocab_size,
                                        state.args.enable_return_routed_experts)
    except BadRequest as exc:
        return _error(400, str(exc))
    futures = [asyncio.wrap_future(state.scheduler.submit(r)) for r in reqs]
    try:
        await asyncio.gather(*futures)
    except asyncio.CancelledError:
        for r in reqs:
            state.scheduler.abort_request(r, "The client closed the connection.")
        raise
    except Exception as exc:  # the worker failed these requests (logged there); tell the client
        return _error(500, f"generation failed: {type(exc).__name__}: {exc}")
    text_lp = bool(body.get("return_text_in_logprobs", False))
    out = [format_response(r, state.tokenizer, text_lp) for r in reqs]
    return web.json_response(out if is_batch else out[0])


# -- health and info -----------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    return web.Response(text="") if _state(request).ready else _not_ready()


async def health_generate(request: web.Request) -> web.Response:
    state = _state(request)
    if not state.ready:
        return _not_ready()
    req = Request(rid=f"health-{time.monotonic_ns()}", input_ids=[0], params=SamplingParams(max_new_tokens=1, temperature=0.0))
    try:
        await asyncio.wait_for(asyncio.wrap_future(state.scheduler.submit(req)), HEALTH_GENERATE_TIMEOUT_S)
    except (TimeoutError, RuntimeError) as exc:
        state.scheduler.abort_request(req, "health check timed out")
        return _error(503, f"health generation failed: {exc!r}")
    return web.Response(text="")


async def model_info(request: web.Request) -> web.Response:
    state = _state(request)
    runner = state.scheduler.runner
    return web.json_response({
        "model_path": state.args.model_path,
        "tokenizer_path": state.args.model_path,
        "served_model_name": state.args.model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": state.scheduler.weight_version,
        "load_format": "auto",
        "model_type": getattr(runner.config, "model_type", None) if runner else None,
        "architectures": getattr(runner.config, "architectures", None) if runner else None,
    })


async def server_info(request: web.Request) -> web.Response:
    state = _state(request)
    runner = state.scheduler.runner
    return web.json_response({
        **asdict(state.args),
        "version": f"embedded-{miles.__version__}",
        "engine": "miles-embedded",
        "weight_version": state.scheduler.weight_version,
        "ready": state.ready,
        "paused": state.scheduler.paused,
        "tp_size": 1,
        "dp_size": 1,
        "attn_implementation": "sdpa",
        "torch_num_threads": state.num_threads,
        "num_params": runner.num_params if runner else None,
        "context_length": runner.context_length if runner else None,
        "startup_time": state.started,
        "internal_states": [state.scheduler.stats()],
    })


# -- cache, abort, pause, memory -----------------------------------------------------------------
async def flush_cache(request: web.Request) -> web.Response:
    return web.Response(text="Cache flushed.")  # no prefix cache: every batch builds its own KV cache


async def abort_request(request: web.Request) -> web.Response:
    try:
        body = await _body(request)
    except BadRequest as exc:
        return _error(400, str(exc))
    n = _state(request).scheduler.abort(rid=body.get("rid"), abort_all=bool(body.get("abort_all", False)))
    logger.info("abort_request %s: %d request(s)", body, n)
    return web.Response(text="")


async def pause_generation(request: web.Request) -> web.Response:
    state = _state(request)
    if not state.ready:
        return _not_ready()
    try:
        mode = (await _body(request)).get("mode", "abort")
        future = state.scheduler.pause(mode)
    except (BadRequest, ValueError) as exc:
        return _error(400, str(exc))
    message = await asyncio.wrap_future(future)
    return web.json_response({"message": message, "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    state = _state(request)
    if not state.ready:
        return _not_ready()
    message = await asyncio.wrap_future(state.scheduler.resume())
    return web.json_response({"message": message, "status": "ok"})


async def memory_noop(request: web.Request) -> web.Response:
    return web.json_response(None)  # CPU engine: nothing to release (SGLang answers null on success)


# -- weights -------------------------------------------------------------------------------------
async def _weight_reply(state: EngineState, fn, writer: bool, **extra: Any) -> web.Response:
    """Run fn on the worker; reply SGLang's {"success", "message"} (400 on failure)."""
    if not state.ready:
        return web.json_response({"success": False, "message": "the engine is still loading the model"}, status=503)
    try:
        message = await asyncio.wrap_future(state.scheduler.run_op(fn, writer=writer))
    except Exception as exc:  # every failure goes back to the caller, who must redo the sync
        logger.warning("weight operation failed: %s", exc, exc_info=not isinstance(exc, ValueError))
        return web.json_response({"success": False, "message": str(exc), **extra}, status=400)
    return web.json_response({"success": True, "message": message, **extra})


async def update_weights_from_disk(request: web.Request) -> web.Response:
    state = _state(request)
    body = await _body(request)
    path, version = body.get("model_path"), body.get("weight_version")
    if body.get("abort_all_requests"):
        state.scheduler.abort(abort_all=True)
    try:
        tensors = await asyncio.to_thread(read_safetensors_dir, path or "")
    except (OSError, ValueError) as exc:
        return web.json_response({"success": False, "message": str(exc), "num_paused_requests": 0}, status=400)

    def apply() -> str:
        state.loader.load(tensors)
        if version is not None:
            state.scheduler.weight_version = str(version)
        return f"Succeeded to update model weights from {path} ({len(tensors)} tensors)."

    return await _weight_reply(state, apply, writer=True, num_paused_requests=0)


async def init_weights_update_group(request: web.Request) -> web.Response:
    state = _state(request)
    b = await _body(request)
    try:
        await asyncio.to_thread(
            state.groups.init, b["master_address"], b["master_port"], b["rank_offset"], b["world_size"],
            b.get("group_name", "weight_update_group"), b.get("backend", "gloo"),
        )
    except KeyError as exc:
        return web.json_response({"success": False, "message": f"missing field {exc}"}, status=400)
    except (ValueError, RuntimeError) as exc:
        return web.json_response({"success": False, "message": f"failed to init group: {exc}"}, status=400)
    return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})


async def update_weights_from_distributed(request: web.Request) -> web.Response:
    state = _state(request)
    b = await _body(request)
    names, dtypes, shapes = b.get("names") or [], b.get("dtypes") or [], b.get("shapes") or []
    group, version, fmt = b.get("group_name", "weight_update_group"), b.get("weight_version"), b.get("load_format")
    if b.get("abort_all_requests"):
        state.scheduler.abort(abort_all=True)

    def apply() -> str:
        try:  # validate first, but still receive: the sender is already broadcasting
            state.loader.check(zip(names, (tuple(s) for s in shapes)))
            problem = None
        except ValueError as exc:
            problem = exc
        named = state.groups.receive(names, dtypes, shapes, group, fmt)
        if problem is not None:
            raise problem
        state.loader.load(named)
        if version is not None:
            state.scheduler.weight_version = str(version)
        return f"Succeeded to update parameter online ({len(named)} tensors)."

    return await _weight_reply(state, apply, writer=True)


async def destroy_weights_update_group(request: web.Request) -> web.Response:
    state = _state(request)
    group = (await _body(request)).get("group_name", "weight_update_group")

    def destroy() -> str:
        state.groups.destroy(group)
        return f"Succeeded to destroy group {group}."

    return await _weight_reply(state, destroy, writer=False)


async def get_weights_by_name(request: web.Request) -> web.Response:
    state = _state(request)
    if not state.ready:
        return _not_ready()
    body = await _body(request)
    future = state.scheduler.run_op(lambda: state.loader.get(body.get("name", ""), int(body.get("truncate_size", 100))))
    try:
        return web.json_response(await asyncio.wrap_future(future))
    except ValueError as exc:
        return _error(400, str(exc))


async def update_weight_version(request: web.Request) -> web.Response:
    state = _state(request)
    body = await _body(request)
    if "new_version" not in body:
        return web.json_response({"success": False, "message": "missing field 'new_version'"}, status=400)
    if body.get("abort_all_requests", True):
        state.scheduler.abort(abort_all=True)
    state.scheduler.weight_version = str(body["new_version"])
    return web.json_response({"success": True, "message": "Weight version updated.", "new_version": str(body["new_version"])})


@web.middleware
async def _bad_request_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except BadRequest as exc:
        return _error(400, str(exc))


def build_app(state: EngineState) -> web.Application:
    """The aiohttp application serving one engine."""
    app = web.Application(client_max_size=1 << 30, middlewares=[_bad_request_middleware])
    app["state"] = state
    r = app.router
    for path in ("/generate",):
        r.add_post(path, generate)
        r.add_put(path, generate)
    for path, handler in (
        ("/health", health), ("/health_generate", health_generate), ("/model_info", model_info),
        ("/get_model_info", model_info), ("/server_info", server_info), ("/get_server_info", server_info),
    ):
        r.add_get(path, handler)
    for path, handler in (
        ("/flush_cache", flush_cache), ("/release_memory_occupation", memory_noop),
        ("/resume_memory_occupation", memory_noop), ("/get_weights_by_name", get_weights_by_name),
    ):
        r.add_get(path, handler)
        r.add_post(path, handler)
    for path, handler in (
        ("/abort_request", abort_request), ("/pause_generation", pause_generation),
        ("/continue_generation", continue_generation), ("/update_weight_version", update_weight_version),
        ("/update_weights_from_disk", update_weights_from_disk), ("/init_weights_update_group", init_weights_update_group),
        ("/update_weights_from_distributed", update_weights_from_distributed),
        ("/destroy_weights_update_group", destroy_weights_update_group),
    ):
        r.add_post(path, handler)
    return app
