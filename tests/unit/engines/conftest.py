"""Fixtures of the router tests: echo workers on 127.0.0.1 and a router process in front of them.

The echo worker is the one stand-in in the suite: it exists to check what the router FORWARDS, so
it records the exact bytes it received and answers with them.
"""

import asyncio
import socket
import threading
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from miles.engines.config import RouterConfig
from miles.engines.process import launch_router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EchoWorker:
    """An SGLang-API look-alike that echoes /generate bodies. Flags are flipped by the test thread."""

    url: str = ""
    healthy: bool = True
    """/health answers 200 (else 503)."""
    drop: bool = False
    """/generate closes the connection without answering (a crashed engine)."""
    delay_s: float = 0.0
    """/generate waits this long before answering (keeps requests in flight)."""
    received: list[bytes] = field(default_factory=list)
    """Bodies of /generate requests, as received."""
    num_flushes: int = 0
    runner: web.AppRunner | None = None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(body)
        if self.drop:
            request.transport.close()
            raise ConnectionResetError("echo worker dropped the connection on purpose")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if b'"stream": true' in body:  # SSE, like SGLang's stream=true
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(b'data: {"i": %d}\n\n' % i)
                await asyncio.sleep(0.05)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        if b"teapot" in body:
            return web.Response(status=418, text="I am a teapot", content_type="text/plain")
        return web.Response(body=body, content_type="application/x-echo")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="ok" if self.healthy else "sick")

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": "echo", "worker": self.url})

    async def flush_cache(self, request: web.Request) -> web.Response:
        self.num_flushes += 1
        return web.Response(text="Cache flushed.")


class EchoWorkers:
    """Echo workers served from one background event loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.workers: list[EchoWorker] = []

    def start(self, **flags) -> EchoWorker:
        return asyncio.run_coroutine_threadsafe(self._start(EchoWorker(**flags)), self.loop).result(10)

    async def _start(self, worker: EchoWorker) -> EchoWorker:
        app = web.Application()
        app.router.add_route("POST", "/generate", worker.generate)
        app.router.add_route("PUT", "/generate", worker.generate)
        app.router.add_get("/health", worker.health)
        app.router.add_get("/model_info", worker.model_info)
        app.router.add_get("/get_model_info", worker.model_info)
        app.router.add_post("/flush_cache", worker.flush_cache)
        worker.runner = web.AppRunner(app, access_log=None)
        await worker.runner.setup()
        site = web.TCPSite(worker.runner, "127.0.0.1", 0)
        await site.start()
        worker.url = f"http://127.0.0.1:{worker.runner.addresses[0][1]}"
        self.workers.append(worker)
        return worker

    def stop(self, worker: EchoWorker) -> None:
        asyncio.run_coroutine_threadsafe(worker.runner.cleanup(), self.loop).result(10)
        self.workers.remove(worker)

    def close(self) -> None:
        for worker in list(self.workers):
            self.stop(worker)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def echo_workers():
    workers = EchoWorkers()
    yield workers
    workers.close()


@pytest.fixture
def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def start_router(tmp_path):
    """start_router(worker_urls, **RouterConfig fields) → router URL; a real router process, stopped after the test."""
    started = []

    def start(worker_urls, ready=True, **cfg_fields):
        port = free_port()
        proc = launch_router("127.0.0.1", port, worker_urls, tmp_path / f"router-{port}.log", RouterConfig(**cfg_fields))
        started.append(proc)
        proc.wait_healthy(30, path="/readiness" if ready else "/health")
        return proc

    yield start
    for proc in started:
        proc.stop()

