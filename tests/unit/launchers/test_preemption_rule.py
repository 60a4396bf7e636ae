"""The batch script's rule that tells a time-limit signal from a preemption (sbatch/miles-het.sbatch)."""

import subprocess

import pytest

from miles.launchers.het_script import TEMPLATE


def _rule(*calls: str) -> list[str]:
    text = TEMPLATE.read_text()
    begin = text.index("# ---- stop-kind")
    end = text.index("# ---- end of stop-kind ----")
    script = text[begin:end] + "\n" + "\n".join(calls)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.parametrize(("squeue", "seconds"), [
    ("UNLIMITED", -1), ("NOT_SET", -1), ("INVALID", -1), ("45", 45), ("03:04", 184), ("2:03:04", 7384),
    ("1-02:03:04", 93784), ("08:09", 489)])
def test_squeue_time_left_in_seconds(squeue, seconds):
    assert _rule(f"to_seconds {squeue}") == [str(seconds)]


def test_time_limit_or_preemption():
    # grace 120 s: Slurm signals with <= 120 s left, up to ~30 s early (its check cadence)
    assert _rule("stop_kind 100 120", "stop_kind 150 120", "stop_kind 165 120", "stop_kind 166 120",
                 "stop_kind 3600 120", "stop_kind -1 120") == \
        ["timeout", "timeout", "timeout", "preemption", "preemption", "preemption"]
