"""Fixtures for checkpoint unit tests: a one-process gloo world with megatron TP=1."""

import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_tp1():
    """CPU shims applied, torch.distributed (gloo, world size 1) and megatron TP=1 initialized.

    Module-scoped and torn down after the module, so the trainer tests' session fixture can build
    its own world later in the same pytest run.
    """
    from miles.trainer import cpu_compat
    from miles.trainer.parallel import init_parallel, teardown_parallel

    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    state = init_parallel(tp_size=1, seed=1234, env=env)
    yield state
    teardown_parallel()
