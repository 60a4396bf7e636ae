"""Shared fixtures: tiny models built offline once per session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_tiny(out: Path, *extra: str) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(out), *extra],
        check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A dense tiny Qwen3 checkpoint (fp32, vocab 512, 2 layers, hidden 64)."""
    return _build_tiny(tmp_path_factory.mktemp("models") / "qwen3-tiny")


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE checkpoint (8 experts, top-2)."""
    return _build_tiny(tmp_path_factory.mktemp("models") / "qwen3-moe-tiny", "--moe")
