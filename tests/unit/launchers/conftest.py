"""Fixtures of the launcher tests: golden files and a runner for `python -m miles.launchers.<tool>`."""

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


@pytest.fixture
def assert_golden():
    """assert_golden(name, actual): compare with golden/<name>; UPDATE_GOLDEN=1 rewrites it instead."""

    def check(name: str, actual: str) -> None:
        path = HERE / "golden" / name
        if os.environ.get("UPDATE_GOLDEN") == "1":
            path.write_text(actual)
        expected = path.read_text() if path.exists() else ""
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), str(path), "current"))
        assert not diff, f"{name} changed; if intended, regenerate with UPDATE_GOLDEN=1:\n{diff}"

    return check


@pytest.fixture
def run_tool(tmp_path):
    """run_tool("submit", *args, env=None) -> CompletedProcess of `python -m miles.launchers.<tool>` in tmp_path,
    with no Slurm variables (and no MILES_CONFIG_DIR) leaking in from the caller."""

    def run(tool: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MILES_"))}
        return subprocess.run([sys.executable, "-m", f"miles.launchers.{tool}", *args], cwd=tmp_path,
                              env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout)

    return run
