"""A named torch.distributed group between a trainer and rollout engines, outside any default group.

The trainer (rank 0) and every engine rank (rank_offset + i) meet through a `tcp://` rendezvous
and build a process group that is *not* the default one, so it can coexist with the trainer's
Megatron world (or with no world at all, as in an engine process).

The construction matches SGLang's `init_custom_process_group` (sglang/srt/utils/common.py):
rendezvous store → `PrefixStore(group_name, store)` → torch's private
`_new_process_group_helper(world_size, rank, [], ...)` → identity rank map in `_world`. Both
sides must build the store the same way or the rendezvous keys differ and both sides hang, so
a Miles trainer can talk to real SGLang and to the embedded engine with this one function.
`torch.distributed.new_group` cannot be used: it needs a default group that contains all peers.

Relies on torch private API (checked against torch 2.13); tests/integration/weight_sync
exercises it with gloo in separate processes.
"""

import logging
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

logger = logging.getLogger(__name__)


def init_custom_process_group(
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout: timedelta | None = None,
) -> dist.ProcessGroup:
    """Join the group `group_name` as `rank` of `world_size`; block until every rank joined.

    init_method is a rendezvous URL such as "tcp://10.0.0.1:29600" (rank 0 hosts the store).
    Group rank equals the rank given here; pass the returned group to collectives
    (`dist.broadcast(t, src=0, group=pg)`). Raises ValueError for a bad rank or a name that is
    already in use in this process.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if group_name in c10d._world.pg_names.values():
        raise ValueError(f"a process group named {group_name!r} already exists in this process")
    timeout = timeout or c10d.default_pg_timeout
    store = _rendezvous_store(init_method, rank, world_size, timeout)
    store = c10d.PrefixStore(group_name, store)
    # With a default NCCL group bound to a device (the trainer's, init_process_group(device_id=...)),
    # torch builds new NCCL groups by ncclCommSplit of the default communicator; the engines are not
    # in that communicator and wait forever for the unique id in the store. Unbinding the default
    # group for this one call makes torch exchange the id through our store, as SGLang expects.
    default_pg = c10d._world.default_pg
    bound_device = default_pg.bound_device_id if default_pg is not None else None
    if bound_device is not None:
        default_pg.bound_device_id = None
    try:
        pg, _ = c10d._new_process_group_helper(
            world_size, rank, [], c10d.Backend(backend), store,
            group_name=group_name, timeout=timeout,
        )
    finally:
        if bound_device is not None:
            default_pg.bound_device_id = bound_device
    # Collectives translate src/dst through this map; global rank == group rank here.
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    logger.info("joined process group %r as rank %d/%d via %s (%s)", group_name, rank, world_size, init_method, backend)
    return pg


def _rendezvous_store(init_method: str, rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The store of `init_method`: for tcp:// a TCPStore that rank 0 hosts, built directly.

    torch's tcp:// rendezvous handler does the same, except under torchrun: there
    (TORCHELASTIC_USE_AGENT_STORE=True) it makes rank 0 a *client* of the elastic agent's store and
    prefixes the keys, so a trainer started by torchrun would wait forever for engines that
    rendezvous the plain way. The keys of this store are those of the plain rendezvous.
    """
    from urllib.parse import urlparse

    url = urlparse(init_method)
    if url.scheme != "tcp":
        store, _, _ = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
        return store
    if not url.hostname or not url.port:
        raise ValueError(f"init_method {init_method!r} needs a host and a port (tcp://HOST:PORT)")
    return dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == 0, timeout=timeout)


def destroy_custom_process_group(pg: dist.ProcessGroup) -> None:
    """Tear down a group made by `init_custom_process_group`; the default group is untouched."""
    dist.destroy_process_group(pg)
