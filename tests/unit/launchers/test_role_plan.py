"""`python -m miles.launchers.role plan`: the shell variables the batch script evals, and its refusals."""

import subprocess


def _plan_vars(stdout: str) -> dict:
    out = subprocess.run(["bash", "-c", 'eval "$1"; for v in RUN_DIR ENGINE_TASKS ENGINE_TASKS_PER_NODE '
                          'ENGINE_GPUS_PER_TASK TRAIN_TASKS TRAIN_TASKS_PER_NODE SRUN_MPI; do echo "$v=${!v}"; done',
                          "_", stdout], capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


def test_plan_of_the_quickstart(run_tool, tmp_path):
    proc = run_tool("role", "plan", "--recipe", "quickstart", "run.output_dir=out dir")
    assert proc.returncode == 0, proc.stderr
    assert _plan_vars(proc.stdout) == {
        "RUN_DIR": str(tmp_path / "out dir" / "quickstart"), "ENGINE_TASKS": "2", "ENGINE_TASKS_PER_NODE": "2",
        "ENGINE_GPUS_PER_TASK": "0", "TRAIN_TASKS": "1", "TRAIN_TASKS_PER_NODE": "1", "SRUN_MPI": "none"}


def test_plan_with_gpus_and_mpi(run_tool):
    proc = run_tool("role", "plan", "--recipe", "quickstart", "cluster.gpus_per_node=4", "cluster.gpus_per_engine=2",
                    "cluster.nodes_train=2", "cluster.bootstrap=mpi")
    got = _plan_vars(proc.stdout)
    assert (got["ENGINE_TASKS_PER_NODE"], got["ENGINE_GPUS_PER_TASK"], got["TRAIN_TASKS"], got["SRUN_MPI"]) == \
        ("2", "2", "8", "pmi2")


def test_plan_refuses_unsupported_recipes_and_non_het_jobs(run_tool):
    proc = run_tool("role", "plan", "--recipe", "glm5")
    assert proc.returncode == 2 and "MLA (multi-head latent attention)" in proc.stderr and proc.stdout == ""
    proc = run_tool("role", "plan", "--recipe", "quickstart", env={"SLURM_JOB_ID": "3", "SLURM_HET_SIZE": "1"})
    assert proc.returncode == 2 and "Miles needs exactly 2" in proc.stderr


def test_roles_outside_slurm_say_so(run_tool):
    proc = run_tool("role", "engine", "--recipe", "quickstart")
    assert proc.returncode == 2 and "not inside a Slurm job step" in proc.stderr


def test_engine_commands(tiny_model):
    from miles.cluster.roles import EngineTask
    from miles.config.loader import load_config
    from miles.launchers.role import engine_command

    cfg = load_config("quickstart", [f"model.path={tiny_model}", "engine.extra_args=[--log-level, debug]"])
    cmd = engine_command(cfg, EngineTask(index=1, node_rank=0), 10072, None, 1)
    assert cmd[1:3] == ["-m", "miles.engines.embedded"]
    assert " ".join(cmd[3:]).endswith(f"--host 0.0.0.0 --port 10072 --dtype float32 --max-batch-size 64 "
                                      f"--random-seed {cfg.run.seed + 1} --num-threads 1 --log-level debug")
    sg = load_config("glm5", [f"model.path={tiny_model}"])
    cmd = engine_command(sg, EngineTask(index=0, node_rank=3), 10072, "10.0.0.1:10073", 8)
    text = " ".join(cmd)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    for flags in ("--host 0.0.0.0 --port 10072", "--tp-size 64", "--base-gpu-id 0", "--dtype bfloat16",
                  "--enable-dp-attention --dp-size 64", "--nnodes 8 --node-rank 3 --dist-init-addr 10.0.0.1:10073"):
        assert flags in text
