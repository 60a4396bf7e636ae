"""Address files: atomic publish, stale files ignored, waiting with a timeout that names what is missing."""

import json
import threading
import time

import pytest

from miles.cluster.rendezvous import (Rendezvous, RendezvousTimeout, dist_env_from_slurm, engine_name, master_node)
from miles.cluster.roles import JobPorts
from miles.cluster.slurm_env import SlurmEnv


def test_publish_then_lookup(tmp_path):
    rdv = Rendezvous(tmp_path, job_id=12, restart=0)
    path = rdv.publish("engine-0", "10.0.0.5", 10072, node="gpu3", pid=4321)
    assert path == tmp_path / "rendezvous" / "engine-0.json"
    assert [p.name for p in path.parent.iterdir()] == ["engine-0.json"]  # no temp file left behind
    addr = rdv.lookup("engine-0")
    assert (addr.url, addr.node, addr.pid) == ("http://10.0.0.5:10072", "gpu3", 4321)
    assert rdv.lookup("engine-1") is None


def test_files_of_another_job_or_restart_are_ignored(tmp_path):
    Rendezvous(tmp_path, job_id=12, restart=0).publish("router", "h", 1)
    assert Rendezvous(tmp_path, job_id=12, restart=1).lookup("router") is None  # requeued: old router is dead
    assert Rendezvous(tmp_path, job_id=13, restart=0).lookup("router") is None
    (tmp_path / "rendezvous" / "engine-0.json").write_text("{half a rec")  # unreadable: as if absent
    assert Rendezvous(tmp_path, job_id=12, restart=0).lookup("engine-0") is None


def test_wait_for_returns_once_everything_is_published(tmp_path):
    rdv = Rendezvous(tmp_path, job_id=5, restart=0)
    rdv.publish(engine_name(0), "a", 1)
    late = threading.Timer(0.3, lambda: rdv.publish(engine_name(1), "b", 2))
    late.start()
    start = time.monotonic()
    addrs = rdv.wait_for([engine_name(0), engine_name(1)], timeout_s=10, poll_s=0.05)
    late.join()
    assert 0.25 < time.monotonic() - start < 5
    assert [a.url for a in addrs.values()] == ["http://a:1", "http://b:2"]


def test_wait_for_timeout_names_the_missing(tmp_path):
    rdv = Rendezvous(tmp_path, job_id=5, restart=2)
    rdv.publish("engine-0", "a", 1)
    with pytest.raises(RendezvousTimeout) as exc:
        rdv.wait_for(["engine-0", "engine-1", "router"], timeout_s=0.3, poll_s=0.05)
    msg = str(exc.value)
    assert "still missing engine-1, router" in msg and "engine-0," not in msg
    assert "job 5 restart 2" in msg and str(tmp_path / "rendezvous" / "engine-1.json") in msg


def test_env_rendezvous_from_a_het_step():
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_HET_SIZE": "2",
           "SLURM_JOB_NODELIST_HET_GROUP_0": "rollout0", "SLURM_JOB_NODELIST_HET_GROUP_1": "localhost,other",
           "SLURM_STEP_NODELIST": "localhost,other"}
    slurm = SlurmEnv(env)
    assert master_node(slurm) == "localhost"  # first node of het-group 1, not of the job
    assert dist_env_from_slurm(slurm) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                          "MASTER_ADDR": "localhost", "MASTER_PORT": str(JobPorts.for_job(77).master)}
    plain = SlurmEnv({**{k: v for k, v in env.items() if "HET" not in k}, "SLURM_STEP_NODELIST": "localhost"})
    assert master_node(plain) == "localhost"


def test_published_record_is_json_with_job_and_restart(tmp_path):
    path = Rendezvous(tmp_path, job_id=9, restart=1).publish("train-0", "h", 3)
    record = json.loads(path.read_text())
    assert (record["job_id"], record["restart"], record["port"]) == (9, 1, 3)
