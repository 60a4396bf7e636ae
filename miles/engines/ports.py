"""Free TCP ports on this machine, for local executors, tests and benchmarks.

Engines of one local run listen on engine.base_port + i, so a run needs a block of consecutive
free ports, not just one.
"""

import random
import socket


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (there is always a race with other processes)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_range(count: int, host: str = "127.0.0.1", low: int = 20000, high: int = 40000) -> int:
    """First port of `count` consecutive ports that are all free right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        if all(_bindable(host, base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found in [{low}, {high}) on {host}")
