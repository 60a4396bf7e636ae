"""The Miles router: one HTTP front for many SGLang-API engines.

    python -m miles.engines.router --host 127.0.0.1 --port 29000 \
        --worker-urls http://127.0.0.1:30000 http://127.0.0.1:30001 [--policy least_in_flight]

Why our own router: sglang-router parses /generate into a typed struct and re-serialises it, which
silently drops `return_routed_experts` and every field it does not know (shared/reference/sglang-api.md
§8). This router forwards the request body BYTES unchanged, so every field reaches the engine.

Behaviour (the contract tests pin):
- /generate (POST/PUT) goes to the healthy worker with the fewest in-flight requests (ties: round
  robin), or plain round robin with --policy round_robin. The worker's status, body and content type
  come back unchanged; HTTP errors (4xx/5xx) are returned as they are, never retried.
- A transport failure (refused, reset, disconnected mid-response) takes that worker out of rotation
  at once and the same body is retried on another healthy worker, up to --max-retries times.
- Background health checks GET /health on every worker each --health-check-interval-s. After
  --health-check-failure-threshold consecutive failures a worker leaves rotation. It RE-ENTERS as
  soon as /health succeeds again (like SGLang's gateway; the old Miles router never re-admitted):
  an engine that was restarted by its launcher, or that was only slow, gets its share back.
- No healthy worker: 503 with a JSON error that says so.
- Worker API like sglang-router 0.3.2 (POST/GET /workers, DELETE /workers/{id}) plus the legacy
  /add_worker, /remove_worker, /list_workers that older RL code calls.
"""

import argparse
import asyncio
import itertools
import json
import logging
import sys
import uuid
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from miles.engines.config import ROUTER_POLICIES, RouterConfig
from miles.errors import ConfigError

logger = logging.getLogger("miles.engines.router")  # not "__main__" under python -m

HEALTH_CHECK_TIMEOUT_S = 20.0
"""A /health probe slower than this counts as failed (SGLang's own health timeout is 20 s)."""
CONNECT_TIMEOUT_S = 10.0
"""Connecting to a worker slower than this is a transport failure (retried elsewhere)."""
_REQUEST_HEADERS = ("content-type", "authorization")
"""Request headers passed on to the worker (the body is passed on byte for byte)."""
_RESPONSE_HEADERS = ("content-type",)
"""Response headers passed back (bodies arrive decompressed, so no content-encoding)."""

# Transport failures: the worker could not be reached or dropped the connection. A connect timeout
# (aiohttp.ConnectionTimeoutError) is a ClientConnectionError too; a total-time timeout is not.
TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


@dataclass
class Worker:
    """One engine behind the router, with the router's view of it."""

    id: str
    url: str
    is_healthy: bool = False
    in_flight: int = 0
    num_requests_total: int = 0
    """Requests this worker answered (any HTTP status)."""
    num_transport_failures: int = 0
    consecutive_failures: int = 0

    def to_json(self) -> dict:
        return {
            "id": self.id, "url": self.url, "is_healthy": self.is_healthy, "load": self.in_flight,
            "num_requests_total": self.num_requests_total, "num_transport_failures": self.num_transport_failures,
        }


class NoHealthyWorker(Exception):
    """No worker is in rotation (or every one was already tried for this request)."""


class WorkerPool:
    """The registered workers and the choice among them. Single event loop: no locks needed."""

    def __init__(self, policy: str, failure_threshold: int):
        assert policy in ROUTER_POLICIES, policy
        self.policy = policy
        self.failure_threshold = failure_threshold
        self.workers: dict[str, Worker] = {}
        self._rr = itertools.count()

    def add(self, url: str) -> Worker:
        worker = Worker(id=str(uuid.uuid4()), url=url.rstrip("/"))
        self.workers[worker.id] = worker
        return worker

    def by_url(self, url: str) -> Worker | None:
        url = url.rstrip("/")
        return next((w for w in self.workers.values() if w.url == url), None)

    def remove(self, worker: Worker) -> None:
        self.workers.pop(worker.id, None)

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.is_healthy]

    def pick(self, exclude: set[str] = frozenset()) -> Worker:
        """The worker for the next request: fewest in flight (ties round robin), or round robin."""
        candidates = [w for w in self.healthy() if w.id not in exclude]
        if not candidates:
            raise NoHealthyWorker
        turn = next(self._rr)
        if self.policy == "least_in_flight":
            least = min(w.in_flight for w in candidates)
            candidates = [w for w in candidates if w.in_flight == least]
        return candidates[turn % len(candidates)]

    def record_probe(self, worker: Worker, ok: bool) -> None:
        """Apply one health-probe result: success re-admits, `failure_threshold` failures evict."""
        if ok:
            if not worker.is_healthy:
                logger.info("worker %s is healthy, in rotation", worker.url)
            worker.is_healthy, worker.consecutive_failures = True, 0
            return
        worker.consecutive_failures += 1
        if worker.is_healthy and worker.consecutive_failures >= self.failure_threshold:
            worker.is_healthy = False
            logger.warning("worker %s failed %d health checks, out of rotation", worker.url, worker.consecutive_failures)

    def record_transport_failure(self, worker: Worker, exc: BaseException) -> None:
        worker.num_transport_failures += 1
        worker.consecutive_failures = max(worker.consecutive_failures, self.failure_threshold)
        if worker.is_healthy:
            logger.warning("worker %s unreachable (%s: %s), out of rotation", worker.url, type(exc).__name__, exc)
        worker.is_healthy = False


def url_problem(url: object) -> str | None:
    """Why `url` cannot be a worker URL, or None if it can."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        return f"worker url must look like http://host:port, got {url!r}"
    return None


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


class Router:
    """The aiohttp application: proxy, health loop and worker API."""

    def __init__(self, cfg: RouterConfig, worker_urls: list[str] = ()):
        self.cfg = cfg
        self.pool = WorkerPool(cfg.policy, cfg.health_check_failure_threshold)
        self._initial_urls = list(worker_urls)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)  # R3 requests and long prompts are large
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        r = app.router
        r.add_route("POST", "/generate", self.handle_proxy)
        r.add_route("PUT", "/generate", self.handle_proxy)
        r.add_route("*", "/v1/{tail:.*}", self.handle_proxy)
        for path in ("/health_generate", "/model_info", "/get_model_info"):
            r.add_get(path, self.handle_proxy)
        r.add_get("/health", self.handle_live)
        r.add_get("/liveness", self.handle_live)
        r.add_get("/readiness", self.handle_readiness)
        r.add_post("/flush_cache", self.handle_flush_cache)
        r.add_get("/get_loads", self.handle_get_loads)
        r.add_post("/workers", self.handle_add_worker)
        r.add_get("/workers", self.handle_list_workers)
        r.add_get("/workers/{worker_id}", self.handle_get_worker)
        r.add_delete("/workers/{worker_id}", self.handle_delete_worker)
        r.add_post("/add_worker", self.handle_legacy_add)
        r.add_post("/remove_worker", self.handle_legacy_remove)
        r.add_get("/list_workers", self.handle_legacy_list)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, sock_connect=CONNECT_TIMEOUT_S)
        # No connection cap: the rollout clients' semaphores bound concurrency, not the router.
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        for url in self._initial_urls:
            self._register(url)
        self._spawn(self._health_loop())

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _register(self, url: str) -> Worker:
        """Add a worker (out of rotation) and probe it at once; it enters rotation when /health is 200."""
        worker = self.pool.add(url)
        logger.info("registered worker %s (id %s)", worker.url, worker.id)
        self._spawn(self._probe(worker))
        return worker

    # -- health ------------------------------------------------------------------------------
    async def _probe(self, worker: Worker) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_CHECK_TIMEOUT_S)
            async with self._session.get(worker.url + "/health", timeout=timeout) as resp:
                await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if worker.id in self.pool.workers:  # it may have been removed while we waited
            self.pool.record_probe(worker, ok)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_check_interval_s)
            await asyncio.gather(*(self._probe(w) for w in list(self.pool.workers.values())))

    # -- proxy -------------------------------------------------------------------------------
    async def handle_proxy(self, request: web.Request) -> web.StreamResponse:
        """Forward the raw body to one worker; retry elsewhere on transport failure only."""
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS}
        path = request.raw_path  # path and query string, as the client sent them
        tried: set[str] = set()
        last_error = "no worker has passed a health check yet"
        for _ in range(self.cfg.max_retries + 1):
            try:
                worker = self.pool.pick(exclude=tried)
            except NoHealthyWorker:
                break
            tried.add(worker.id)
            worker.in_flight += 1
            try:
                return await self._forward(request, worker, path, body, headers)
            except TRANSPORT_ERRORS as exc:
                self.pool.record_transport_failure(worker, exc)
                last_error = f"{worker.url}: {type(exc).__name__}: {exc}"
            except TimeoutError:
                return _json_error(504, f"{worker.url} did not answer {path} within {self.cfg.request_timeout_s} s")
            finally:
                worker.in_flight -= 1
        num_healthy = len(self.pool.healthy())
        return _json_error(
            503,
            f"no healthy worker to serve {request.path}: {len(self.pool.workers)} registered, {num_healthy} healthy, "
            f"{len(tried)} tried; last error: {last_error}",
        )

    async def _forward(self, request: web.Request, worker: Worker, path: str, body: bytes, headers: dict) -> web.StreamResponse:
        async with self._session.request(request.method, worker.url + path, data=body, headers=headers) as resp:
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() in _RESPONSE_HEADERS}
            if resp.content_type != "text/event-stream":
                payload = await resp.read()  # a disconnect here is a transport failure, retried
                worker.num_requests_total += 1
                return web.Response(status=resp.status, body=payload, headers=out_headers)
            # Streaming: once bytes went to the client, the request can no longer be retried.
            first = await resp.content.readany()
            worker.num_requests_total += 1
            stream = web.StreamResponse(status=resp.status, headers=out_headers)
            await stream.prepare(request)
            chunk = first
            while chunk:
                await stream.write(chunk)
                try:
                    chunk = await resp.content.readany()
                except TRANSPORT_ERRORS as exc:
                    self.pool.record_transport_failure(worker, exc)
                    break
            await stream.write_eof()
            return stream

    # -- health and loads -----------------------------------------------------------------------
    async def handle_live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_readiness(self, request: web.Request) -> web.Response:
        num_healthy = len(self.pool.healthy())
        if num_healthy == 0:
            return _json_error(503, f"not ready: 0 of {len(self.pool.workers)} workers healthy")
        return web.json_response({"status": "ready", "healthy_workers": num_healthy, "total_workers": len(self.pool.workers)})

    async def handle_get_loads(self, request: web.Request) -> web.Response:
        return web.json_response({"workers": [{"worker": w.url, "load": w.in_flight} for w in self.pool.workers.values()]})

    async def handle_flush_cache(self, request: web.Request) -> web.Response:
        """Fan POST /flush_cache out to every healthy worker."""
        workers = self.pool.healthy()

        async def flush(worker: Worker) -> str | None:
            try:
                async with self._session.post(worker.url + "/flush_cache") as resp:
                    text = await resp.text()
                    return None if resp.status == 200 else f"HTTP {resp.status}: {text[:200]}"
            except (*TRANSPORT_ERRORS, TimeoutError) as exc:
                return f"{type(exc).__name__}: {exc}"

        results = await asyncio.gather(*(flush(w) for w in workers))
        errors = {w.url: err for w, err in zip(workers, results) if err is not None}
        flushed = len(workers) - len(errors)
        if errors:
            return web.json_response({"status": "error", "workers_flushed": flushed, "errors": errors}, status=500)
        return web.json_response({"status": "success", "workers_flushed": flushed})

    # -- worker API ------------------------------------------------------------------------------
    async def handle_add_worker(self, request: web.Request) -> web.Response:
        try:
            url = (await request.json())["url"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return _json_error(400, 'POST /workers needs a JSON body {"url": "http://host:port"}')
        if url_problem(url):
            return _json_error(400, url_problem(url))
        existing = self.pool.by_url(url)
        if existing is not None:
            return _json_error(409, f"worker {existing.url} is already registered as {existing.id}")
        worker = self._register(url)
        return web.json_response(
            {"status": "accepted", "worker_id": worker.id, "url": worker.url, "location": f"/workers/{worker.id}"},
            status=202,
        )

    async def handle_list_workers(self, request: web.Request) -> web.Response:
        workers = [w.to_json() for w in self.pool.workers.values()]
        return web.json_response({"workers": workers, "total": len(workers)})

    async def handle_get_worker(self, request: web.Request) -> web.Response:
        worker = self.pool.workers.get(request.match_info["worker_id"])
        if worker is None:
            return _json_error(404, f"no worker with id {request.match_info['worker_id']}")
        return web.json_response(worker.to_json())

    async def handle_delete_worker(self, request: web.Request) -> web.Response:
        worker = self.pool.workers.get(request.match_info["worker_id"])
        if worker is None:
            return _json_error(404, f"no worker with id {request.match_info['worker_id']}")
        self.pool.remove(worker)
        logger.info("removed worker %s (id %s)", worker.url, worker.id)
        return web.json_response({"status": "accepted", "worker_id": worker.id, "url": worker.url}, status=202)

    async def handle_legacy_add(self, request: web.Request) -> web.Response:
        url = request.query.get("url")
        if url_problem(url):
            return _json_error(400, f"POST /add_worker?url=...: {url_problem(url)}")
        worker = self.pool.by_url(url) or self._register(url)  # idempotent, as engines re-register
        return web.json_response({"status": "success", "worker_id": worker.id, "url": worker.url})

    async def handle_legacy_remove(self, request: web.Request) -> web.Response:
        worker = self.pool.by_url(request.query.get("url", ""))
        if worker is None:
            return _json_error(404, f"no worker with url {request.query.get('url')!r}")
        self.pool.remove(worker)
        return web.json_response({"status": "success", "url": worker.url})

    async def handle_legacy_list(self, request: web.Request) -> web.Response:
        return web.json_response({"urls": [w.url for w in self.pool.workers.values()]})


def parse_args(argv: list[str] | None = None) -> tuple[RouterConfig, list[str]]:
    """CLI → (RouterConfig, worker urls). Flags mirror RouterConfig's fields."""
    defaults = RouterConfig()
    ap = argparse.ArgumentParser(prog="miles-router", description="HTTP router in front of SGLang-API engines")
    ap.add_argument("--host", default=defaults.host)
    ap.add_argument("--port", type=int, default=defaults.port)
    ap.add_argument("--worker-urls", nargs="*", default=[], help="engine base URLs, e.g. http://10.0.0.1:30000")
    ap.add_argument("--policy", choices=ROUTER_POLICIES, default=defaults.policy)
    ap.add_argument("--health-check-interval-s", type=float, default=defaults.health_check_interval_s)
    ap.add_argument("--health-check-failure-threshold", type=int, default=defaults.health_check_failure_threshold)
    ap.add_argument("--max-retries", type=int, default=defaults.max_retries)
    ap.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    try:
        cfg = RouterConfig(
            host=args.host, port=args.port, policy=args.policy,
            health_check_interval_s=args.health_check_interval_s,
            health_check_failure_threshold=args.health_check_failure_threshold,
            max_retries=args.max_retries, request_timeout_s=args.request_timeout_s,
        )
    except ConfigError as exc:
        ap.error(str(exc))
    for url in args.worker_urls:
        if url_problem(url):
            ap.error(url_problem(url))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s [router] %(levelname)s %(name)s: %(message)s")
    return cfg, args.worker_urls


def main(argv: list[str] | None = None) -> int:
    """Console script `miles-router`: serve until SIGTERM/SIGINT."""
    cfg, worker_urls = parse_args(argv)
    logger.info("router on %s:%d, policy %s, workers %s", cfg.host, cfg.port, cfg.policy, worker_urls)
    web.run_app(Router(cfg, worker_urls).app(), host=cfg.host, port=cfg.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
