"""init_custom_process_group: a named gloo group across 3 processes, one of which has a default group."""

import multiprocessing as mp
import socket
import traceback

import pytest


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _member(rank: int, ports: list[int], default_port: int | None, out) -> None:
    try:
        out.put((rank, _join_twice(rank, ports, default_port)))
    except BaseException:  # child process boundary: hand the traceback to the test
        out.put((rank, traceback.format_exc()))


def _join_twice(rank: int, ports: list[int], default_port: int | None) -> list:
    import torch
    import torch.distributed as dist

    from miles.weight_sync.process_group import destroy_custom_process_group, init_custom_process_group

    if default_port is not None:  # a trainer-like process: its own 1-rank default world exists already
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{default_port}", world_size=1, rank=0)
    results = []
    for round_, port in enumerate(ports):  # the same group name again after destroy, on a fresh port
        pg = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 3, rank, "wug")
        t = torch.arange(4.0) * (round_ + 1) if rank == 0 else torch.zeros(4)
        dist.broadcast(t, src=0, group=pg)
        results.append((pg.rank(), pg.size(), t.tolist()))
        destroy_custom_process_group(pg)
    if default_port is not None:
        results.append(("default world intact", dist.get_world_size()))
        dist.destroy_process_group()
    return results


def test_broadcast_in_named_group_with_and_without_a_default_group():
    """Rank 0 (a trainer) has its own default world; ranks 1 and 2 (engines) have none."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    *ports, default_port = free_ports(3)
    procs = [ctx.Process(target=_member, args=(r, ports, default_port if r == 0 else None, out)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
                p.join()
    for rank, res in results.items():
        assert isinstance(res, list), f"rank {rank} failed:\n{res}"
    assert [p.exitcode for p in procs] == [0, 0, 0]
    for rank in range(3):
        assert results[rank][:2] == [(rank, 3, [0.0, 1.0, 2.0, 3.0]), (rank, 3, [0.0, 2.0, 4.0, 6.0])]
    assert results[0][2] == ("default world intact", 1)


def test_bad_rank_is_rejected():
    from miles.weight_sync.process_group import init_custom_process_group

    with pytest.raises(ValueError, match="rank 3 is outside world_size 3"):
        init_custom_process_group("gloo", "tcp://127.0.0.1:1", 3, 3, "x")
