"""SlurmEnv reads SLURM_* lazily from the given mapping, with typed values and clear errors."""

import pytest

from miles.cluster.slurm_env import SlurmEnv, SlurmEnvError, expand_nodelist

HET_STEP = {  # a task of `srun --het-group=1` in a 2-component het job (Slurm 22.05, dev cluster)
    "SLURM_JOB_ID": "41", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURMD_NODENAME": "n1",
    "SLURM_HET_SIZE": "2", "SLURM_JOB_NODELIST_HET_GROUP_0": "n0", "SLURM_JOB_NODELIST_HET_GROUP_1": "n1,n2",
    "SLURM_STEP_NODELIST": "n1,n2", "SLURM_JOB_NODELIST": "n1,n2",
}


def test_typed_values_of_a_het_step():
    slurm = SlurmEnv(HET_STEP)
    assert (slurm.job_id, slurm.procid, slurm.ntasks, slurm.localid) == (41, 1, 2, 1)
    assert slurm.restart_count == 0  # SLURM_RESTART_COUNT is only set after a requeue
    assert SlurmEnv({**HET_STEP, "SLURM_RESTART_COUNT": "3"}).restart_count == 3
    assert slurm.het_size == 2 and slurm.in_job and slurm.node_name == "n1"
    assert slurm.het_group_nodes(0) == ["n0"] and slurm.het_group_nodes(1) == ["n1", "n2"]
    assert slurm.step_nodes() == ["n1", "n2"]


def test_reads_nothing_until_asked(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    slurm = SlurmEnv()  # no Slurm around: constructing must not fail
    assert not slurm.in_job
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # read at access time, not at construction
    assert slurm.in_job and slurm.job_id == 7


def test_missing_and_malformed_variables_say_what_is_wrong():
    with pytest.raises(SlurmEnvError, match=r"SLURM_PROCID is not set: not inside a Slurm job step"):
        SlurmEnv({"SLURM_JOB_ID": "1"}).procid
    with pytest.raises(SlurmEnvError, match=r"SLURM_NTASKS='two' is not an integer"):
        SlurmEnv({"SLURM_NTASKS": "two"}).ntasks
    with pytest.raises(SlurmEnvError, match=r"het group 1 does not exist \(SLURM_HET_SIZE=0\)"):
        SlurmEnv({"SLURM_JOB_ID": "1"}).het_group_nodes(1)
    with pytest.raises(SlurmEnvError, match=r"het group 2 does not exist \(SLURM_HET_SIZE=2\)"):
        SlurmEnv(HET_STEP).het_group_nodes(2)


def test_plain_nodelists_expand_without_scontrol():
    assert expand_nodelist("gpu7") == ["gpu7"]
    assert expand_nodelist("a,b,c") == ["a", "b", "c"]
    assert expand_nodelist(" ") == []


def test_bracketed_nodelists_expand_in_python(monkeypatch):
    import miles.cluster.slurm_env as slurm_env

    def no_scontrol(*args):
        raise AssertionError(f"scontrol called for {args}")

    monkeypatch.setattr(slurm_env, "_scontrol", no_scontrol)
    assert expand_nodelist("n[0-2,5],gpu[07-08]-a") == ["n0", "n1", "n2", "n5", "gpu07-a", "gpu08-a"]


def test_node_addr_of_a_resolvable_name_is_the_name():
    assert SlurmEnv({"SLURMD_NODENAME": "localhost"}).node_addr() == "localhost"
