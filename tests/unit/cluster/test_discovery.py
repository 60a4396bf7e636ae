"""Run-time topology discovery: Slurm's topology text and variables, nvidia-smi fabric ids, the file exchange."""

import json

import pytest

from miles.cluster.discovery import (FabricId, NodeIdentity, discover_cluster, exchange_identities, expand_hostlist,
                                     parse_nvidia_smi_fabric, parse_scontrol_topology, parse_topology_addr,
                                     read_node_identity)
from miles.errors import ConfigError

# Captured on the Slurm 24.11 chroot (shared/reference/slurm-24-chroot.md §3).
BLOCK_TOPOLOGY = """BlockName=b1 BlockIndex=0 Nodes=n[0-1] BlockSize=2
BlockName=b2 BlockIndex=1 Nodes=n[2-3] BlockSize=2
AggregatedBlock=b[1-2] BlockIndex=2 Nodes=n[0-3] BlockSize=4
"""
TREE_TOPOLOGY = """SwitchName=s0 Level=0 LinkSpeed=1 Nodes=gpu[01-02] Switches=(null)
SwitchName=s1 Level=0 LinkSpeed=1 Nodes=gpu[03-04] Switches=(null)
SwitchName=s2 Level=1 LinkSpeed=1 Nodes=gpu[01-04] Switches=s[0-1]
"""


def _gpu(bus: str, state: str, clique: str, uuid: str) -> str:
    return f"""GPU 00000000:{bus}:00.0
    Product Name                          : NVIDIA GB200
    GPU Fabric GUID                       : 0x6d9419000347bb4c
    Voltage
        Graphics                          : 685.000 mV
    Fabric
        State                             : {state}
        Status                            : Success
        CliqueId                          : {clique}
        ClusterUUID                       : {uuid}
        Health
            Bandwidth                     : Full
    Processes                             : None
"""


UUID_A = "5d3c0b1e-8f2a-4c6d-9e1f-0a1b2c3d4e5f"


def test_hostlists_expand_in_slurm_order_with_zero_padding():
    assert expand_hostlist("n[0-1,3],gpu[08-10]-a,login") == ["n0", "n1", "n3", "gpu08-a", "gpu09-a", "gpu10-a", "login"]
    assert expand_hostlist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    with pytest.raises(ValueError, match="bad range"):
        expand_hostlist("n[a-b]")


def test_topology_addr_follows_its_pattern():
    assert parse_topology_addr("b2.n3", "block.node") == {"block": ["b2"], "node": ["n3"]}
    assert parse_topology_addr("s2.s0.n3", "switch.switch.node") == {"switch": ["s2", "s0"], "node": ["n3"]}
    assert NodeIdentity("n3", "b2.n3", "block.node").block == "b2"
    assert NodeIdentity("n3", "s2.s0.n3", "switch.switch.node").block == ""
    with pytest.raises(ValueError, match="does not match"):
        parse_topology_addr("b2.n3", "node")


def test_scontrol_show_topology_blocks_aggregates_and_switches():
    topo = parse_scontrol_topology(BLOCK_TOPOLOGY)
    assert [(b.name, b.nodes) for b in topo.blocks] == [("b1", ("n0", "n1")), ("b2", ("n2", "n3"))]
    assert [(b.name, b.nodes) for b in topo.aggregated] == [("b[1-2]", ("n0", "n1", "n2", "n3"))]
    assert topo.block_of() == {"n0": "b1", "n1": "b1", "n2": "b2", "n3": "b2"}
    tree = parse_scontrol_topology(TREE_TOPOLOGY)
    assert [(s.name, s.level, s.nodes) for s in tree.switches] == [
        ("s0", 0, ("gpu01", "gpu02")), ("s1", 0, ("gpu03", "gpu04")), ("s2", 1, ("gpu01", "gpu02", "gpu03", "gpu04"))]
    assert tree.blocks == () and parse_scontrol_topology("No topology information available\n").blocks == ()


def test_nvidia_smi_fabric_ids_per_gpu():
    text = _gpu("01", "Completed", "32766", UUID_A) + "\n" + _gpu("02", "Completed", "32766", UUID_A)
    assert parse_nvidia_smi_fabric(text) == [FabricId(UUID_A, "32766")] * 2
    # HGX H100: in-node NVSwitch fabric "Completed" with an all-zero ClusterUUID -> no multi-node domain.
    zero = _gpu("01", "Completed", "0", "00000000-0000-0000-0000-000000000000")
    na = _gpu("02", "N/A", "N/A", "N/A")
    in_progress = _gpu("03", "In Progress", "7", UUID_A)
    assert parse_nvidia_smi_fabric(zero + na + in_progress) == [None, None, None]


def test_read_node_identity_with_an_injected_runner():
    calls = []

    def run(cmd):
        calls.append(cmd)
        return {"nvidia-smi": _gpu("01", "Completed", "5", UUID_A) * 1, "scontrol": BLOCK_TOPOLOGY}[cmd[0]]

    env = {"SLURM_TOPOLOGY_ADDR": "b1.n0", "SLURM_TOPOLOGY_ADDR_PATTERN": "block.node"}
    me = read_node_identity(env, "n0", run, with_scontrol=True)
    assert me == NodeIdentity("n0", "b1.n0", "block.node", FabricId(UUID_A, "5"), BLOCK_TOPOLOGY)
    assert calls == [["nvidia-smi", "-q"], ["scontrol", "show", "topology"]]
    assert read_node_identity({}, "n1", lambda cmd: None) == NodeIdentity("n1")  # no nvidia-smi, no Slurm topology


def test_discovery_prefers_fabric_then_scontrol_then_topology_addr_then_configuration():
    nodes = ["n0", "n1", "n2", "n3"]
    a, b = FabricId(UUID_A, "1"), FabricId(UUID_A, "2")
    addr = {n: f"b{1 + (i % 2)}.{n}" for i, n in enumerate(nodes)}  # n0,n2 in b1; n1,n3 in b2
    ids = {n: NodeIdentity(n, addr[n], "block.node", [a, b, b, a][i], BLOCK_TOPOLOGY if n == "n0" else "")
           for i, n in enumerate(nodes)}
    found = discover_cluster(nodes, 4, ids, domain_nodes=18)
    assert found.source.startswith("NVLink fabric") and found.shape.blocks == (("n0", "n3"), ("n1", "n2"))
    ids = {n: NodeIdentity(n, i.topology_addr, i.topology_pattern, None if n == "n1" else i.fabric, i.scontrol_topology)
           for n, i in ids.items()}
    found = discover_cluster(nodes, 4, ids, domain_nodes=18)
    assert found.source == "scontrol show topology (topology/block)"
    assert found.shape.blocks == (("n0", "n1"), ("n2", "n3"))
    assert found.notes == ("NVLink fabric identity on 3 of 4 nodes",)
    ids = {n: NodeIdentity(n, i.topology_addr, i.topology_pattern) for n, i in ids.items()}
    found = discover_cluster(nodes, 4, ids, domain_nodes=18)
    assert found.source == "SLURM_TOPOLOGY_ADDR (topology/block)" and found.shape.blocks == (("n0", "n2"), ("n1", "n3"))
    found = discover_cluster(nodes, 8, {}, domain_nodes=3, fabric="xGMI")
    assert found.source.startswith("configuration") and found.shape.blocks == (("n0", "n1", "n2"), ("n3",))
    assert found.shape.fabric == "xGMI" and found.shape.gpus_per_node == 8


def test_identities_exchange_through_files_and_ignore_other_jobs(tmp_path):
    a = NodeIdentity("n0", "b1.n0", "block.node", FabricId(UUID_A, "1"))
    (tmp_path / "topology").mkdir()
    (tmp_path / "topology" / "n1.json").write_text(json.dumps(
        {"job_id": 6, "restart": 0, "node": "n1", "topology_addr": "", "topology_pattern": "", "fabric": None,
         "scontrol_topology": ""}))  # another job's file: ignored
    with pytest.raises(ConfigError, match=r"no identity from node\(s\) n1 .*job 7 restart 0"):
        exchange_identities(tmp_path, 7, 0, ["n0", "n1"], a, timeout_s=0.3, poll_s=0.05)
    b = NodeIdentity("n1", "b2.n1", "block.node")
    got = exchange_identities(tmp_path, 7, 0, ["n0", "n1"], b, timeout_s=1)
    assert got == {"n0": a, "n1": b}
    assert exchange_identities(tmp_path, 7, 0, ["n0", "n1"], None, timeout_s=1) == got  # readers only wait
