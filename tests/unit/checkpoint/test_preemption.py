"""Stop requests (signal flag, stop file), the test pause hook and the trained-sample log."""

import json
import os
import signal
import threading
import time

import pytest

from miles.checkpoint.config import CheckpointConfig
from miles.checkpoint.preemption import STOP_FILE, StopRequest, TrainedSampleLog, pause_for_test
from miles.errors import ConfigError


def test_signal_sets_the_flag_and_a_second_term_is_not_caught(tmp_path):
    stop = StopRequest(tmp_path)
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stop.install_signal_handlers()
        assert stop.seen_locally() is None and stop.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.seen_locally() == "SIGUSR1" and stop.requested() == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.seen_locally() == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the next TERM kills
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_stop_file_is_a_request_and_clear_removes_it(tmp_path):
    stop = StopRequest(tmp_path)
    (tmp_path / STOP_FILE).write_text("preemption USR1 1.0\n")
    assert stop.requested() == "stop file"
    stop.clear()
    assert not (tmp_path / STOP_FILE).exists() and stop.requested() is None


def test_pause_hook_waits_for_a_stop_once(tmp_path, monkeypatch):
    stop = StopRequest(tmp_path)
    pause_for_test("train", 1, tmp_path, stop)  # variable unset: no-op
    assert not (tmp_path / "test-pause").exists()
    monkeypatch.setenv("MILES_TEST_PAUSE_AT", "rollout:0,train:1")
    threading.Timer(0.5, lambda: (tmp_path / STOP_FILE).touch()).start()
    began = time.monotonic()
    pause_for_test("train", 1, tmp_path, stop)
    assert 0.4 < time.monotonic() - began < 5 and (tmp_path / "test-pause" / "train-1").exists()
    (tmp_path / STOP_FILE).unlink()
    monkeypatch.setenv("MILES_TEST_PAUSE_S", "0.2")
    began = time.monotonic()
    pause_for_test("train", 1, tmp_path, stop)  # this point already paused: no wait
    pause_for_test("sync", 1, tmp_path, stop)  # not listed
    assert time.monotonic() - began < 0.1
    pause_for_test("rollout", 0, tmp_path, stop)  # no stop comes: gives up after MILES_TEST_PAUSE_S
    assert 0.15 < time.monotonic() - began < 2


def test_trained_sample_log_rewinds_to_the_resumed_step(tmp_path):
    log = TrainedSampleLog(tmp_path)
    log.rewind(0)  # no file yet
    for step in range(4):
        log.append(step, [f"{step}-0", f"{step}-1"])
    log.rewind(2)  # a hard stop after the checkpoint of step 2: steps 2 and 3 are trained again
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["samples"] == ["1-0", "1-1"]


@pytest.mark.parametrize(("kw", "message"), [
    ({"preempt_signal": "TERM"}, "checkpoint.preempt_signal must be USR1 or USR2"),
    ({"preempt_grace_s": 0}, "checkpoint.preempt_grace_s must be >= 1"),
    ({"max_timeout_requeues": -1}, "checkpoint.max_timeout_requeues must be >= 0")])
def test_preemption_fields_are_checked(kw, message):
    with pytest.raises(ConfigError, match=message):
        CheckpointConfig(**kw)
