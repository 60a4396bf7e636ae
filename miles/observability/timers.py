"""Seconds per phase of an RL step, as metrics ("time/<phase>")."""

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Accumulates wall time per phase; `metrics()` returns and resets them."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self._seconds.items()}
        out["time/step"] = sum(self._seconds.values())
        self._seconds = {}
        return out
