"""Fixtures of the launcher tests: golden files and a runner for `python -m miles.launchers.<tool>`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


@pytest.fixture
def run_tool(tmp_path):
    """run_tool("submit", *args, env=None) -> CompletedProcess of `python -m miles.launchers.<tool>` in tmp_path,
    with no Slurm variables (and no MILES_CONFIG_DIR) leaking in from the caller."""

    def run(tool: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MILES_"))}
        return subprocess.run([sys.executable, "-m", f"miles.launchers.{tool}", *args], cwd=tmp_path,
                              env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout)

    return run
