"""Plumbing of the GPU benchmarks (tools/gpu/bench_gpu.py): progress lines, child processes under a
deadline, ports, JSON files.

Every benchmark part runs in child processes, each in a session of its own, so that a part that
hangs (an NCCL collective whose peer died, a server that never answers) is stopped at its
deadline by signalling its process group: SIGTERM, then SIGKILL after a grace period. Processes
are only ever signalled by the PIDs started here. Workers write their numbers to JSON files as
they go, so a part stopped at its deadline still reports what it measured.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_T0 = time.monotonic()


def log(message: str) -> None:
    """One progress line: wall clock, seconds since start, message."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: Path, obj) -> None:
    """Write atomically (a reader never sees half a file, a kill never leaves one)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def log_tail(path: Path, num_lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-num_lines:])
    except OSError as exc:
        return f"(no log {path}: {exc})"


def rank_env(rank: int, world_size: int, port: int, local_rank: int | None = None) -> dict[str, str]:
    """The env:// contract of one trainer rank (as torchrun sets it)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank if local_rank is None else local_rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@dataclass
class ChildResult:
    """How one child process ended."""

    name: str
    returncode: int | None
    """Exit code; None when it was stopped at the deadline or because a sibling failed."""
    log: Path
    stopped: str = ""
    """Why it was stopped ("" if it exited by itself)."""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True: the group id is the child's PID
    except ProcessLookupError:
        pass


def stop_group(popen: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the child's process group, wait up to grace_s, then SIGKILL the group and reap."""
    if popen.poll() is None:
        _signal_group(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(popen.pid, signal.SIGKILL)
    popen.wait()


def run_children(children: Sequence[tuple[str, list[str], Mapping[str, str]]], timeout_s: float, log_dir: Path,
                 sibling_grace_s: float = 20.0, term_grace_s: float = 15.0,
                 services: Sequence[str] = ()) -> list[ChildResult]:
    """Start (name, argv, extra env) children together and wait for all of them, at most timeout_s.

    A child that exits non-zero gets its siblings stopped after sibling_grace_s (its peers would
    otherwise wait in a collective until the deadline). Children named in `services` (servers)
    never exit by themselves: they are stopped once all the others have exited, and count as
    exited 0 then. Each child's output goes to log_dir/<name>.log.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    deadline = time.monotonic() + timeout_s
    for name, argv, extra_env in children:
        path = log_dir / f"{name}.log"
        with open(path, "w") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **extra_env},
                                          cwd=REPO, start_new_session=True))
        logs.append(path)
    stopped = [""] * len(procs)
    is_service = [name in services for name, _, _ in children]
    failed_at = None
    try:
        while any(p.poll() is None for p, service in zip(procs, is_service) if not service):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + sibling_grace_s):
                why = f"deadline of {timeout_s:.0f} s" if now > deadline else "a sibling process failed"
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        stopped[i] = why
                        stop_group(p, term_grace_s)
                break
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):  # services, and everything on KeyboardInterrupt: leave nothing running
            if p.poll() is None:
                stop_group(p, term_grace_s)
                if is_service[i] and not stopped[i]:
                    stopped[i] = "service, stopped after the others"
    results = []
    for i, (p, (name, _, _)) in enumerate(zip(procs, children)):
        if stopped[i] == "service, stopped after the others":
            results.append(ChildResult(name, 0, logs[i], ""))
        else:
            results.append(ChildResult(name, None if stopped[i] else p.returncode, logs[i], stopped[i]))
    return results


def python_cmd(script: str, *args) -> list[str]:
    """argv running tools/gpu/<script> with this interpreter."""
    return [sys.executable, str(Path(__file__).with_name(script)), *map(str, args)]


def describe_failure(results: Sequence[ChildResult]) -> str | None:
    """None when every child exited 0, else one line per problem with its log tail."""
    problems = []
    for r in results:
        if r.returncode == 0:
            continue
        what = f"stopped ({r.stopped})" if r.stopped else f"exited with code {r.returncode}"
        tail = log_tail(r.log, 12)
        last = tail.splitlines()[-1].strip() if tail.strip() else "(empty log)"
        problems.append(f"{r.name} {what}: {last}\n  last lines of {r.log}:\n{tail}")
    return "\n".join(problems) or None
