"""Fixtures for trainer unit tests: a one-process gloo world with megatron TP=1."""

import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_tp1():
    """CPU shims applied, torch.distributed (gloo, world size 1) and megatron TP=1 initialized."""
    from miles.trainer import cpu_compat
    from miles.trainer.parallel import init_parallel, teardown_parallel

    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    state = init_parallel(tp_size=1, seed=1234, env=env)
    yield state
    teardown_parallel()
