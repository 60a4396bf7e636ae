"""Run-time topology discovery: which of the job's nodes share a fast-fabric domain.

    me = read_node_identity(slurm.env, run=subprocess_runner)     # this node: SLURM_TOPOLOGY_ADDR, NVLink fabric id
    ids = exchange_identities(run_dir, job_id, restart, nodes, me, timeout_s)   # every node's, via files
    found = discover_cluster(nodes, slots_per_node, ids, domain_nodes=18)
    found.shape        # ClusterShape over the job's nodes, the planner's input
    found.source       # which source decided the domains

Sources, first that covers every node wins:
1. NVLink fabric identity from `nvidia-smi -q` (section "Fabric": State Completed, ClusterUUID + CliqueId),
   the physical truth on GB200/GB300. An all-zero ClusterUUID (HGX nodes whose in-node NVSwitch fabric also
   reports "Completed") names no multi-node domain.
2. `scontrol show topology` of topology/block: `BlockName=b1 BlockIndex=0 Nodes=n[0-1] BlockSize=2`
   (AggregatedBlock lines are unions of base blocks and are not domains).
3. `SLURM_TOPOLOGY_ADDR` / `SLURM_TOPOLOGY_ADDR_PATTERN` of each node (`b2.n3` / `block.node`).
4. Configuration: `domain_nodes` consecutive nodes of the job's node list per domain.
topology/tree (`SwitchName=s0 Level=0 ... Nodes=...`) is parsed but not used as a domain: a leaf
switch groups nodes of one network switch, not of one NVLink/xGMI fabric.

Parsers are pure (text in, data out); `read_node_identity` takes the command runner as an argument,
so tests feed captured output.
"""

import json
import logging
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from miles.atomic_file import atomic_write_text
from miles.cluster.slurm_env import expand_hostlist
from miles.cluster.topology import ClusterShape
from miles.errors import ConfigError

logger = logging.getLogger(__name__)

Runner = Callable[[list[str]], str | None]
"""Runs a command, returns its stdout, or None when it is missing or fails."""
TOPOLOGY_DIR = "topology"


def parse_topology_addr(addr: str, pattern: str) -> dict[str, list[str]]:
    """SLURM_TOPOLOGY_ADDR split by SLURM_TOPOLOGY_ADDR_PATTERN: {"block": ["b2"], "node": ["n3"]}
    (tree: {"switch": ["s2", "s0"], "node": ["n3"]}, top switch first)."""
    names, kinds = addr.split("."), pattern.split(".")
    if len(names) != len(kinds):
        raise ValueError(f"SLURM_TOPOLOGY_ADDR={addr!r} does not match SLURM_TOPOLOGY_ADDR_PATTERN={pattern!r}")
    out: dict[str, list[str]] = {}
    for kind, name in zip(kinds, names):
        out.setdefault(kind, []).append(name)
    return out


@dataclass(frozen=True)
class Block:
    """One line of `scontrol show topology`: a block (topology/block) or a switch (topology/tree)."""

    name: str
    nodes: tuple[str, ...]
    level: int = 0
    """Switch level (tree; 0 = leaf); 0 for blocks."""


@dataclass(frozen=True)
class SlurmTopology:
    """What `scontrol show topology` prints, parsed."""

    blocks: tuple[Block, ...] = ()
    """Base blocks (BlockName lines), the fast-fabric domains of topology/block."""
    aggregated: tuple[Block, ...] = ()
    """AggregatedBlock lines (unions of consecutive base blocks)."""
    switches: tuple[Block, ...] = ()
    """SwitchName lines of topology/tree (Nodes= of leaf switches; upper levels list Switches=)."""

    def block_of(self) -> dict[str, str]:
        """Node name -> its base block."""
        return {node: b.name for b in self.blocks for node in b.nodes}


def parse_scontrol_topology(text: str) -> SlurmTopology:
    """Parse `scontrol show topology`; lines of other forms ("No topology information available") are ignored."""
    blocks, aggregated, switches = [], [], []
    for line in text.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        nodes = tuple(expand_hostlist(fields["Nodes"])) if fields.get("Nodes", "(null)") != "(null)" else ()
        if "BlockName" in fields:
            blocks.append(Block(fields["BlockName"], nodes))
        elif "AggregatedBlock" in fields:
            aggregated.append(Block(fields["AggregatedBlock"], nodes))
        elif "SwitchName" in fields:
            switches.append(Block(fields["SwitchName"], nodes, int(fields.get("Level", 0))))
    return SlurmTopology(tuple(blocks), tuple(aggregated), tuple(switches))


@dataclass(frozen=True)
class FabricId:
    """A GPU's NVLink fabric identity: GPUs with equal ids share one multi-node NVLink domain."""

    cluster_uuid: str
    clique_id: str


def parse_nvidia_smi_fabric(text: str) -> list[FabricId | None]:
    """The fabric identity of each GPU in `nvidia-smi -q` output, in order; None where the GPU has none
    (State not Completed, N/A values, or an all-zero ClusterUUID)."""
    out: list[FabricId | None] = []
    for gpu in re.split(r"^GPU [0-9A-Fa-f:.]+\s*$", text, flags=re.M)[1:]:
        found = re.search(r"^([ \t]*)Fabric[ \t]*\n((?:\1[ \t]+.*\n?)*)", gpu, flags=re.M)
        values = {}
        for line in (found.group(2) if found else "").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                values.setdefault(key.strip(), value.strip())
        uuid, clique = values.get("ClusterUUID", "N/A"), values.get("CliqueId", "N/A")
        valid = values.get("State") == "Completed" and "N/A" not in (uuid, clique) and uuid.strip("0-")
        out.append(FabricId(uuid, clique) if valid else None)
    return out


@dataclass(frozen=True)
class NodeIdentity:
    """What one node knows about its own place in the topology."""

    node: str
    topology_addr: str = ""
    """SLURM_TOPOLOGY_ADDR ("" when unset)."""
    topology_pattern: str = ""
    """SLURM_TOPOLOGY_ADDR_PATTERN."""
    fabric: FabricId | None = None
    """The node's NVLink fabric identity (every GPU agrees), or None."""
    scontrol_topology: str = ""
    """`scontrol show topology` output, carried by the group's first node only (one call per job)."""

    @property
    def block(self) -> str:
        """The topology/block block from SLURM_TOPOLOGY_ADDR, or ""."""
        if not self.topology_addr or not self.topology_pattern:
            return ""
        return parse_topology_addr(self.topology_addr, self.topology_pattern).get("block", [""])[0]


def subprocess_runner(cmd: list[str], timeout_s: float = 60.0) -> str | None:
    """The default Runner: stdout of cmd, or None when it is missing, fails or times out."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def read_node_identity(env: Mapping[str, str], node: str, run: Runner = subprocess_runner,
                       with_scontrol: bool = False) -> NodeIdentity:
    """This node's identity: SLURM_TOPOLOGY_ADDR(_PATTERN), `nvidia-smi -q` fabric ids, optionally scontrol's text."""
    fabric = None
    smi = run(["nvidia-smi", "-q"])
    if smi:
        ids = set(parse_nvidia_smi_fabric(smi))
        if len(ids) == 1:
            fabric = ids.pop()
        elif len(ids) > 1:
            logger.warning("node %s: GPUs report different NVLink fabric ids %s; ignoring them", node, ids)
    scontrol = (run(["scontrol", "show", "topology"]) or "") if with_scontrol else ""
    return NodeIdentity(node, env.get("SLURM_TOPOLOGY_ADDR", ""), env.get("SLURM_TOPOLOGY_ADDR_PATTERN", ""),
                        fabric, scontrol)


def exchange_identities(run_dir: str | Path, job_id: int, restart: int, nodes: Sequence[str],
                        me: NodeIdentity | None, timeout_s: float, poll_s: float = 0.2) -> dict[str, NodeIdentity]:
    """Publish `me` (one task per node passes it) as <run_dir>/topology/<node>.json and return every node's
    identity; files of another job or restart are ignored. ConfigError names the nodes still missing."""
    folder = Path(run_dir) / TOPOLOGY_DIR
    if me is not None:
        folder.mkdir(parents=True, exist_ok=True)
        record = {"job_id": job_id, "restart": restart, **asdict(me)}
        atomic_write_text(folder / f"{me.node}.json", json.dumps(record))
    deadline, found = time.monotonic() + timeout_s, {}
    while True:
        for node in nodes:
            if node in found:
                continue
            try:
                record = json.loads((folder / f"{node}.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if (record.pop("job_id"), record.pop("restart")) == (job_id, restart):
                fabric = record.pop("fabric")
                found[node] = NodeIdentity(**record, fabric=FabricId(**fabric) if fabric else None)
        missing = [n for n in nodes if n not in found]
        if not missing:
            return {n: found[n] for n in nodes}
        if time.monotonic() >= deadline:
            raise ConfigError(f"topology discovery: after {timeout_s:.0f} s no identity from node(s) "
                              f"{', '.join(missing)} (expected {folder}/<node>.json from job {job_id} restart "
                              f"{restart}); set cluster.rank_order=slurm to skip discovery")
        time.sleep(poll_s)


@dataclass(frozen=True)
class Discovered:
    """The cluster shape over the job's nodes and where its domains came from."""

    shape: ClusterShape
    source: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Why earlier sources were not used."""


def _group(nodes: Sequence[str], key: Callable[[str], object]) -> tuple[tuple[str, ...], ...]:
    """Nodes grouped by key, groups in order of their first node, nodes in the given order."""
    groups: dict[object, list[str]] = {}
    for node in nodes:
        groups.setdefault(key(node), []).append(node)
    return tuple(tuple(g) for g in groups.values())


def discover_cluster(nodes: Sequence[str], slots_per_node: int, identities: Mapping[str, NodeIdentity],
                     domain_nodes: int, fabric: str = "NVLink") -> Discovered:
    """The ClusterShape over `nodes` (the job's node order), domains from the first source covering every node."""
    notes: list[str] = []
    ids = [identities.get(n) for n in nodes]
    if all(i is not None and i.fabric for i in ids):
        blocks = _group(nodes, lambda n: identities[n].fabric)
        return Discovered(ClusterShape(len(nodes), slots_per_node, blocks=blocks, fabric=fabric),
                          "NVLink fabric identity (nvidia-smi -q: ClusterUUID/CliqueId)")
    notes.append(f"NVLink fabric identity on {sum(bool(i and i.fabric) for i in ids)} of {len(nodes)} nodes")
    text = next((i.scontrol_topology for i in ids if i is not None and i.scontrol_topology), "")
    block_of = parse_scontrol_topology(text).block_of()
    if all(n in block_of for n in nodes):
        blocks = _group(nodes, block_of.__getitem__)
        return Discovered(ClusterShape(len(nodes), slots_per_node, blocks=blocks, fabric=fabric),
                          "scontrol show topology (topology/block)", tuple(notes))
    notes.append(f"scontrol show topology names a block for {sum(n in block_of for n in nodes)} of {len(nodes)} nodes")
    if all(i is not None and i.block for i in ids):
        blocks = _group(nodes, lambda n: identities[n].block)
        return Discovered(ClusterShape(len(nodes), slots_per_node, blocks=blocks, fabric=fabric),
                          "SLURM_TOPOLOGY_ADDR (topology/block)", tuple(notes))
    notes.append(f"SLURM_TOPOLOGY_ADDR names a block on {sum(bool(i and i.block) for i in ids)} of {len(nodes)} nodes")
    step = max(domain_nodes, 1)
    blocks = tuple(tuple(nodes[s:s + step]) for s in range(0, len(nodes), step))
    return Discovered(ClusterShape(len(nodes), slots_per_node, blocks=blocks, fabric=fabric),
                      f"configuration (domains of {step} node(s) in the job's node order)", tuple(notes))
