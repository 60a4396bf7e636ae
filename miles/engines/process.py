"""Engines and the router as local subprocesses (tests, and the local executor).

    engine = launch_embedded_engine(model_dir, "127.0.0.1", 30000, run_dir / "engine0.log")
    router = launch_router("127.0.0.1", 29000, [engine.url], run_dir / "router.log")
    engine.wait_healthy(120); router.wait_healthy(30, path="/readiness")
    ...
    router.stop(); engine.stop()

Processes are stopped by their own PID only (SIGTERM, then SIGKILL), never by name, so several runs
and other users' jobs can share the machine. Each server writes stdout and stderr to its log file;
a failed start raises `ServerStartError` with the tail of that log.
"""

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from miles.engines.config import RouterConfig

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40


class ServerStartError(RuntimeError):
    """A server process exited, or did not become healthy in time; the message carries its log tail."""


def _log_tail(path: Path, num_lines: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(lines[-num_lines:])


def probe_http(opener: urllib.request.OpenerDirector, url: str) -> str | None:
    """GET url once: None when it answers 200, else a short reason ("HTTP 503", "URLError: ...")."""
    try:
        with opener.open(url, timeout=5) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


_TRAINER_WORLD_ENV = frozenset({
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
})


class ServerProcess:
    """One HTTP server running as a child process."""

    def __init__(self, name: str, cmd: list[str], host: str, port: int, log_path: str | os.PathLike):
        self.name = name
        self.cmd = cmd
        self.url = f"http://{host}:{port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A server is not a rank of the trainer's world: drop what torchrun/srun-style launchers set,
        # or e.g. TORCHELASTIC_USE_AGENT_STORE reroutes the engine's weight-update rendezvous.
        env = {k: v for k, v in os.environ.items() if k not in _TRAINER_WORLD_ENV and not k.startswith("TORCHELASTIC_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C in the parent's terminal does not reach the server; we stop it.
            self._popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        logger.info("started %s (pid %d) at %s, log %s", name, self._popen.pid, self.url, self.log_path)

    @property
    def pid(self) -> int:
        return self._popen.pid

    def poll(self) -> int | None:
        """Exit code, or None while running."""
        return self._popen.poll()

    def wait_healthy(self, timeout_s: float, path: str = "/health") -> None:
        """Poll GET `path` until it answers 200. Raises ServerStartError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local URLs: never via a proxy
        while True:
            code = self._popen.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.name} (pid {self.pid}) exited with code {code} before {path} was healthy; "
                    f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            last = probe_http(opener, self.url + path)
            if last is None:
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} (pid {self.pid}) not healthy at {self.url}{path} after {timeout_s:.0f} s "
                    f"(last: {last}); last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL. Returns the exit code."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM for %.0f s, killing", self.name, self.pid, timeout_s)
                self.kill()
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL now (a crash, as far as everyone else can tell) and reap the process."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGKILL)
        self._popen.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerProcess({self.name!r}, pid={self.pid}, url={self.url!r})"


def launch_embedded_engine(
    model_path: str | os.PathLike, host: str, port: int, log_path: str | os.PathLike, extra_args: Sequence[str] = (),
) -> ServerProcess:
    """Start `python -m miles.engines.embedded` serving model_path on host:port."""
    cmd = [sys.executable, "-m", "miles.engines.embedded", "--model-path", str(model_path),
           "--host", host, "--port", str(port), *extra_args]
    return ServerProcess(f"engine:{port}", cmd, host, port, log_path)


def launch_router(
    host: str, port: int, worker_urls: Sequence[str], log_path: str | os.PathLike, router_cfg: RouterConfig | None = None,
) -> ServerProcess:
    """Start `python -m miles.engines.router` on host:port (host/port override router_cfg's)."""
    cfg = router_cfg or RouterConfig()
    cmd = [sys.executable, "-m", "miles.engines.router", "--host", host, "--port", str(port),
           "--policy", cfg.policy,
           "--health-check-interval-s", str(cfg.health_check_interval_s),
           "--health-check-failure-threshold", str(cfg.health_check_failure_threshold),
           "--max-retries", str(cfg.max_retries),
           "--request-timeout-s", str(cfg.request_timeout_s),
           "--worker-urls", *worker_urls]
    return ServerProcess(f"router:{port}", cmd, host, port, log_path)
