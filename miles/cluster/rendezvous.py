"""Rendezvous without Ray: address files in the run directory, and torch.distributed env from Slurm or MPI.

    rdv = Rendezvous(run_dir, job_id=slurm.job_id, restart=slurm.restart_count)
    rdv.publish("engine-0", host, port)                    # engine task (atomic write)
    addrs = rdv.wait_for(["engine-0", "engine-1"], 900)    # router, controller: {name: Address}

Files live in `<run_dir>/rendezvous/<name>.json` (the run directory is on the shared filesystem).
Each carries the job id and restart count; a reader ignores files of an earlier job or restart, so a
requeued job never connects to the previous run's dead servers.

Trainer ranks get the env:// contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
`dist_env_from_slurm` (SLURM_PROCID/NTASKS/LOCALID; the master is the first node of het-group 1)
or from `dist_env_from_mpi` (rank and size from MPI.COMM_WORLD; rank 0 broadcasts its address).
"""

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from miles.atomic_file import atomic_write_text
from miles.cluster.roles import JobPorts
from miles.cluster.slurm_env import SlurmEnv

logger = logging.getLogger(__name__)

RENDEZVOUS_DIR = "rendezvous"
ROUTER = "router"


def engine_name(index: int) -> str:
    """Rendezvous name of engine `index`."""
    return f"engine-{index}"


def trainer_name(rank: int) -> str:
    """Rendezvous name of trainer rank `rank` (published for operators and tests: node and pid)."""
    return f"train-{rank}"


class RendezvousTimeout(TimeoutError):
    """Some addresses were not published in time; the message names them and where they were expected."""


@dataclass(frozen=True)
class Address:
    """One published endpoint."""

    name: str
    host: str
    port: int
    node: str
    """Slurm node name of the publisher."""
    pid: int
    """Process id of the publisher on its node."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Rendezvous:
    """The address files of one job run (job id + restart count) in run_dir/rendezvous/."""

    def __init__(self, run_dir: str | os.PathLike, job_id: int, restart: int):
        self.dir = Path(run_dir) / RENDEZVOUS_DIR
        self.job_id = job_id
        self.restart = restart

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def publish(self, name: str, host: str, port: int, node: str = "", pid: int | None = None) -> Path:
        """Write name's address atomically (temp file + rename: readers never see half a file)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {"name": name, "host": host, "port": port, "node": node, "pid": os.getpid() if pid is None else pid,
                  "job_id": self.job_id, "restart": self.restart}
        atomic_write_text(self.path(name), json.dumps(record))
        logger.info("published %s = %s:%d", name, host, port)
        return self.path(name)

    def lookup(self, name: str) -> Address | None:
        """name's address if this job run published it, else None (absent, or from another job/restart)."""
        try:
            record = json.loads(self.path(name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("unreadable rendezvous file %s: %s", self.path(name), exc)
            return None
        if (record.get("job_id"), record.get("restart")) != (self.job_id, self.restart):
            return None
        return Address(name=name, host=record["host"], port=int(record["port"]), node=record.get("node", ""),
                       pid=int(record.get("pid", 0)))

    def wait_for(self, names: list[str], timeout_s: float, poll_s: float = 0.2) -> dict[str, Address]:
        """Every name's address, waiting up to timeout_s; RendezvousTimeout names the missing ones."""
        deadline = time.monotonic() + timeout_s
        found: dict[str, Address] = {}
        while True:
            for name in names:
                if name not in found and (addr := self.lookup(name)) is not None:
                    found[name] = addr
            missing = [n for n in names if n not in found]
            if not missing:
                return {n: found[n] for n in names}
            if time.monotonic() >= deadline:
                raise RendezvousTimeout(
                    f"rendezvous: after {timeout_s:.0f} s still missing {', '.join(missing)} "
                    f"(expected {', '.join(str(self.path(n)) for n in missing)} from job {self.job_id} "
                    f"restart {self.restart}); see their logs in {self.dir.parent / 'logs'}")
            time.sleep(poll_s)


def master_node(slurm: SlurmEnv) -> str:
    """First node of het-group 1 in a het job, else the first node of this step."""
    return slurm.het_group_nodes(1)[0] if slurm.het_size else slurm.step_nodes()[0]


def dist_env_from_slurm(slurm: SlurmEnv) -> dict[str, str]:
    """The env:// variables of this task, from SLURM_PROCID/NTASKS/LOCALID and the job id."""
    return {
        "RANK": str(slurm.procid), "WORLD_SIZE": str(slurm.ntasks), "LOCAL_RANK": str(slurm.localid),
        "MASTER_ADDR": slurm.node_addr(master_node(slurm)), "MASTER_PORT": str(JobPorts.for_job(slurm.job_id).master),
    }


def dist_env_from_mpi(slurm: SlurmEnv, comm=None) -> dict[str, str]:
    """The env:// variables from MPI: rank/size of COMM_WORLD, the node-local rank from a shared-memory
    split, and the master address and port chosen by rank 0 (its own node) and broadcast to all."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        local_rank = local.Get_rank()
    finally:
        local.Free()
    master = None
    if comm.Get_rank() == 0:
        master = (slurm.node_addr(), JobPorts.for_job(slurm.job_id).master)
    addr, port = comm.bcast(master, root=0)
    return {"RANK": str(comm.Get_rank()), "WORLD_SIZE": str(comm.Get_size()), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
