"""`SlurmEnv`: the one reader of `SLURM_*` variables, lazy (nothing is read at import or construction).

    slurm = SlurmEnv()                      # or SlurmEnv({"SLURM_JOB_ID": "12", ...}) in tests
    slurm.job_id, slurm.restart_count, slurm.procid, slurm.ntasks, slurm.localid
    slurm.het_group_nodes(1)                # ["n1", "n2"] from SLURM_JOB_NODELIST_HET_GROUP_1
    slurm.node_addr("n1")                   # an address other nodes can connect to

Facts of Slurm 22.05 this relies on (docs/slurm.md, shared/reference/slurm-dev-cluster.md §4):
`SLURM_HET_JOB_ID` and `SLURM_HET_JOB_OFFSET` are never set; a task finds the het components through
`SLURM_HET_SIZE` and `SLURM_JOB_NODELIST_HET_GROUP_<n>`, which every step of a het job inherits.
`SLURM_PROCID` is numbered from 0 inside each `srun --het-group=<n>` step. `SLURM_JOB_ID` is the
het leader's id in every component.
"""

import logging
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from functools import cache

from miles.errors import ConfigError

logger = logging.getLogger(__name__)

SCONTROL_TIMEOUT_S = 30.0
"""scontrol calls slower than this fail (a dead slurmctld makes client commands hang)."""


class SlurmEnvError(ConfigError):
    """A Slurm variable Miles needs is missing or malformed (not inside the expected kind of job step)."""


@cache
def _scontrol(*args: str) -> str:
    """stdout of `scontrol ARGS` (cached: node lists and node addresses do not change during a job)."""
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmEnvError(f"`scontrol {' '.join(args)}` failed: {exc}") from exc
    if proc.returncode != 0:
        raise SlurmEnvError(f"`scontrol {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


_BRACKET = re.compile(r"\[([^\]]*)\]")


def expand_hostlist(expr: str) -> list[str]:
    """Host names of a Slurm hostlist ("n[0-1,3],gpu[01-02]-a"), zero padding kept, in order."""
    out: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", expr.strip()):
        names = [""]
        pos = 0
        for m in _BRACKET.finditer(item):
            choices = []
            for part in m.group(1).split(","):
                lo, _, hi = part.partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()):
                    raise ValueError(f"bad range {part!r} in hostlist {expr!r}")
                choices += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
            names = [n + item[pos:m.start()] + c for n in names for c in choices]
            pos = m.end()
        out += [n + item[pos:] for n in names]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list ("n[0-3],gpu7"), in Slurm's order.

    Parsed in Python (`expand_hostlist`: comma lists, numeric ranges with zero padding, several
    brackets per name); a form it does not know goes through `scontrol show hostnames`.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        return []
    try:
        return expand_hostlist(nodelist)
    except ValueError:
        return _scontrol("show", "hostnames", nodelist).split()


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        return False
    return True


@cache
def node_addr(name: str) -> str:
    """Address to reach node `name`: the name itself when it resolves, else its slurm.conf NodeAddr.

    Real clusters resolve node names; the dev cluster's virtual nodes (n0, n1) do not, and their
    NodeAddr is 127.0.0.1.
    """
    if _resolves(name):
        return name
    for field in _scontrol("show", "node", "-o", name).split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    raise SlurmEnvError(f"node {name!r} does not resolve and `scontrol show node {name}` has no NodeAddr")


class SlurmEnv:
    """Typed, lazy view of the Slurm environment of this process (or of a given mapping)."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        self._environ = environ

    @property
    def env(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def _get(self, name: str) -> str:
        try:
            return self.env[name]
        except KeyError:
            raise SlurmEnvError(f"{name} is not set: not inside a Slurm job step (run this through srun/sbatch)") from None

    def _int(self, name: str, default: int | None = None) -> int:
        if default is not None and name not in self.env:
            return default
        raw = self._get(name)
        try:
            return int(raw)
        except ValueError:
            raise SlurmEnvError(f"{name}={raw!r} is not an integer") from None

    @property
    def in_job(self) -> bool:
        """Whether this process runs inside a Slurm job (batch script or step)."""
        return "SLURM_JOB_ID" in self.env

    @property
    def job_id(self) -> int:
        """The job id (the het leader's id in every component of a het job)."""
        return self._int("SLURM_JOB_ID")

    @property
    def restart_count(self) -> int:
        """How many times the job was requeued (0 on the first run)."""
        return self._int("SLURM_RESTART_COUNT", default=0)

    @property
    def procid(self) -> int:
        """Rank of this task in its step (from 0 in each `srun --het-group=<n>` step)."""
        return self._int("SLURM_PROCID")

    @property
    def ntasks(self) -> int:
        """Tasks in this step."""
        return self._int("SLURM_NTASKS")

    @property
    def localid(self) -> int:
        """Rank of this task on its node."""
        return self._int("SLURM_LOCALID")

    @property
    def node_name(self) -> str:
        """Slurm name of the node this task runs on."""
        return self.env.get("SLURMD_NODENAME") or socket.gethostname()

    @property
    def het_size(self) -> int:
        """Number of het-job components (0 outside a het job)."""
        return self._int("SLURM_HET_SIZE", default=0)

    def het_group_nodes(self, group: int) -> list[str]:
        """Nodes of het-job component `group`, expanded."""
        if self.het_size == 0 or not 0 <= group < self.het_size:
            raise SlurmEnvError(f"het group {group} does not exist (SLURM_HET_SIZE={self.het_size}); "
                                f"submit the job as a heterogeneous job (sbatch/miles-het.sbatch)")
        return expand_nodelist(self._get(f"SLURM_JOB_NODELIST_HET_GROUP_{group}"))

    def step_nodes(self) -> list[str]:
        """Nodes of this step (SLURM_STEP_NODELIST, else the job's node list), expanded."""
        raw = self.env.get("SLURM_STEP_NODELIST") or self._get("SLURM_JOB_NODELIST")
        return expand_nodelist(raw)

    def node_addr(self, name: str | None = None) -> str:
        """Address of node `name` (default: this task's node) that other nodes can connect to."""
        return node_addr(name or self.node_name)
