"""ServerProcess: health waiting with log tails, graceful stop, escalation to SIGKILL."""

import os
import signal
import sys
import time

import pytest
import requests

from miles.engines.process import ServerProcess, ServerStartError, launch_router

from .conftest import free_port


def test_router_process_lifecycle(tmp_path):
    port = free_port()
    router = launch_router("127.0.0.1", port, [], tmp_path / "logs" / "router.log")
    try:
        assert router.url == f"http://127.0.0.1:{port}"
        router.wait_healthy(30)
        assert requests.get(router.url + "/workers", timeout=5).json() == {"workers": [], "total": 0}
        # No worker: /readiness stays 503, and the error says so with the log's tail.
        with pytest.raises(ServerStartError) as err:
            router.wait_healthy(1, path="/readiness")
        msg = str(err.value)
        assert f"not healthy at {router.url}/readiness after 1 s (last: HTTP 503)" in msg
        assert "router on 127.0.0.1:%d" % port in msg
    finally:
        code = router.stop()
    assert code == 0  # SIGTERM is a clean shutdown
    assert router.poll() == 0


def test_exit_before_healthy_reports_code_and_log(tmp_path):
    cmd = [sys.executable, "-m", "miles.engines.router", "--port", str(free_port()), "--max-retries", "-1"]
    proc = ServerProcess("router", cmd, "127.0.0.1", 1, tmp_path / "bad.log")
    with pytest.raises(ServerStartError) as err:
        proc.wait_healthy(30)
    msg = str(err.value)
    assert f"(pid {proc.pid}) exited with code 2" in msg
    assert "router.max_retries must be >= 0" in msg


def test_stop_escalates_to_sigkill(tmp_path):
    log = tmp_path / "stubborn.log"
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    proc = ServerProcess("stubborn", [sys.executable, "-c", code], "127.0.0.1", 1, log)
    deadline = time.monotonic() + 30
    while "ready" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    assert proc.stop(timeout_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - start < 5


def test_kill(tmp_path):
    proc = ServerProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], "127.0.0.1", 1, tmp_path / "s.log")
    proc.kill()
    assert proc.poll() == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)  # reaped: the PID is gone
