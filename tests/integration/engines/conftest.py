"""Embedded engines as real subprocesses on free 127.0.0.1 ports, stopped by PID after each module."""

import socket
from pathlib import Path

import pytest
import requests

from miles.engines.process import launch_embedded_engine

ENGINE_START_S = 120
ENGINE_ARGS = ("--num-threads", "1")
"""One intra-op thread: on 2 shared cores, OpenMP teams stall each other and decode gets 10-30x slower."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    """A started engine plus small JSON helpers."""

    def __init__(self, proc):
        self.proc = proc
        self.url = proc.url

    def post(self, path: str, body=None, timeout: float = 120) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=timeout)

    def get(self, path: str, timeout: float = 30) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout)

    def generate(self, body: dict, timeout: float = 120):
        r = self.post("/generate", body, timeout)
        assert r.status_code == 200, r.text
        return r.json()

    def internal_state(self) -> dict:
        return self.get("/server_info").json()["internal_states"][0]


@pytest.fixture(scope="module")
def start_engine(tmp_path_factory):
    """Factory: start_engine(model_path, *extra_args, wait=True) -> Engine; all stopped at module end."""
    logs = tmp_path_factory.mktemp("engine-logs")
    procs = []

    def start(model_path: str | Path, *extra_args: str, wait: bool = True) -> Engine:
        port = free_port()
        proc = launch_embedded_engine(model_path, "127.0.0.1", port, logs / f"engine-{port}.log",
                                      extra_args=(*ENGINE_ARGS, *extra_args))
        procs.append(proc)
        if wait:
            proc.wait_healthy(ENGINE_START_S)
        return Engine(proc)

    yield start
    for proc in procs:
        assert proc.stop() == 0, f"{proc} did not shut down cleanly on SIGTERM"


@pytest.fixture(scope="module")
def engine(start_engine, tiny_model) -> Engine:
    """One engine on the tiny dense model, shared by a test module."""
    return start_engine(tiny_model)
