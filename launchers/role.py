"""`python -m miles.launchers.role ROLE --recipe R [overrides]`: what every task of a Miles het job runs.

    plan        batch script, once: validate the config, print the layout as shell variables
    engine      het-group 0, one task per engine (per node of a multi-node engine): publish the
                address in <run_dir>/rendezvous/, then exec the engine server
    router      het-group 0, one task on the first rollout node: wait for every engine's address,
                publish its own, then exec the router
    trainer     het-group 1, one task per GPU: join torch.distributed (env:// from SLURM_* or, with
                --bootstrap mpi, through mpi4py) with RANK from the topology planner's rank map
                (cluster.rank_order=topology, docs/topology.md), then run miles.driver.train (rank 0 = controller)
    dist-check  any srun step: join torch.distributed like a trainer and all_reduce the ranks
                (a bootstrap smoke test; needs no recipe; with --recipe, in the recipe's rank order,
                so cluster.rank_order=topology applies the rank map as for a trainer)

sbatch/miles-het.sbatch starts these steps; each task's output goes to
<run_dir>/logs/<group>-<rank>.r<restart>.log (rollout-0, rollout-router, train-1, ...).
Exit status: 0 done, 2 bad config or a feature Miles lacks, 75 trainer stopped on request after saving
(preemption, time limit: the batch script decides whether to requeue), 1 anything else (traceback in the log).
"""

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace

from miles.cluster.job_placement import apply_rank_map
from miles.cluster.plan import unsupported_features
from miles.cluster.platforms import check_imex_channels
from miles.cluster.rendezvous import (ROUTER, Rendezvous, dist_env_from_mpi, dist_env_from_slurm, engine_name,
                                      trainer_name)
from miles.cluster.roles import EngineTask, HetLayout, JobPorts, Role
from miles.cluster.slurm_env import SlurmEnv
from miles.cluster.slurm_rollout import ROLE_ENV
from miles.engines.config import embedded_engine_args
from miles.errors import ConfigError

logger = logging.getLogger("miles.launchers.role")

BIND_HOST = "0.0.0.0"
"""Servers listen on every interface; they publish the node's address (SlurmEnv.node_addr)."""
EXIT_CONFIG = 2


def _setup_logging(role: Role | None, slurm: SlurmEnv) -> None:
    label = f"{role.label} r{role.restart}" if role else f"rank {slurm.env.get('SLURM_PROCID', '?')}"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s [{label}] %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _exec(cmd: list[str]) -> None:
    """Replace this process by cmd (srun keeps tracking the same pid; signals reach the server)."""
    logger.info("exec %s", shlex.join(cmd))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def _run_dir(cfg) -> str:
    from miles.config.loader import run_dir

    return str(run_dir(cfg).resolve())


def plan(cfg, slurm: SlurmEnv) -> int:
    """Print the layout the batch script needs as `NAME=value` shell lines (values shell-quoted)."""
    if slurm.in_job and slurm.het_size != 2:
        raise ConfigError(f"the job has {slurm.het_size or 'no'} het components; Miles needs exactly 2 "
                          f"(submit sbatch/miles-het.sbatch or use miles-submit)")
    missing = unsupported_features(cfg)
    if missing:
        raise ConfigError("this recipe needs pieces Miles does not have yet:\n  - " + "\n  - ".join(missing))
    layout = HetLayout.from_config(cfg)
    ck = cfg.checkpoint
    values = {
        "RUN_DIR": _run_dir(cfg), "ENGINE_TASKS": layout.engine_tasks,
        "ENGINE_TASKS_PER_NODE": layout.engine_tasks_per_node, "ENGINE_GPUS_PER_TASK": layout.engine_gpus_per_task,
        "TRAIN_TASKS": layout.train_tasks, "TRAIN_TASKS_PER_NODE": layout.trainers_per_node,
        "SRUN_MPI": cfg.cluster.srun_mpi if cfg.cluster.bootstrap == "mpi" else "none",
        "PREEMPT_SIGNAL": ck.preempt_signal, "PREEMPT_GRACE_S": ck.preempt_grace_s,
        "REQUEUE_ON_PREEMPTION": int(ck.requeue_on_preemption), "MAX_TIMEOUT_REQUEUES": ck.max_timeout_requeues,
    }
    sys.stdout.write("".join(f"{k}={shlex.quote(str(v))}\n" for k, v in values.items()))
    return 0


def engine_command(cfg, task: EngineTask, port: int, dist_init_addr: str | None, nnodes: int) -> list[str]:
    """The server command of one engine task: the embedded engine, or SGLang's launch_server with the
    flags of miles.engines.sglang (TP = cluster.gpus_per_engine; --gpus-per-task masks the GPUs, so
    the engine's first GPU is 0)."""
    eng, model = cfg.engine, cfg.model.path
    seed = cfg.run.seed + task.index
    if eng.kind == "embedded":
        return [sys.executable, "-m", "miles.engines.embedded", "--model-path", model, "--host", BIND_HOST,
                "--port", str(port), *embedded_engine_args(eng, seed, cfg.r3.enabled)]
    from miles.engines.sglang import SGLangConfig, build_sglang_args, is_moe_checkpoint

    sglang = replace(getattr(cfg, "sglang", None) or SGLangConfig(), tp_size=max(cfg.cluster.gpus_per_engine, 1),
                     first_gpu=0)
    args = build_sglang_args(model, replace(eng, host=BIND_HOST), sglang, port, gpu_id=0, seed=seed,
                             moe=is_moe_checkpoint(model))
    if nnodes > 1:
        args += ["--nnodes", str(nnodes), "--node-rank", str(task.node_rank), "--dist-init-addr", dist_init_addr]
    return [sys.executable, "-m", "sglang.launch_server", *args]


def _check_platform(cfg) -> None:
    """The platform's step-level requirements (an IMEX channel on gb200/gb300), before any CUDA context."""
    if cfg.cluster.platform:
        channels = check_imex_channels(cfg.cluster.platform)
        logger.info("platform %s; IMEX channels in this step: %s", cfg.cluster.platform, ", ".join(channels) or "none")


def engine(cfg, slurm: SlurmEnv) -> int:
    _check_platform(cfg)
    layout = HetLayout.from_config(cfg)
    task = EngineTask.from_procid(slurm.procid, layout)
    ports = JobPorts.for_job(slurm.job_id)
    port = ports.engine_http(slurm.localid)
    dist_init = None
    if layout.nodes_per_engine > 1:  # tasks are one per node, in node order: the engine's first node leads
        first = slurm.step_nodes()[task.index * layout.nodes_per_engine]
        dist_init = f"{slurm.node_addr(first)}:{ports.engine_dist(0)}"
    if task.node_rank == 0:
        rdv = Rendezvous(_run_dir(cfg), slurm.job_id, slurm.restart_count)
        rdv.publish(engine_name(task.index), slurm.node_addr(), port, node=slurm.node_name)
    logger.info("engine %d (node %d of %d) on %s port %d, pid %d", task.index, task.node_rank,
                layout.nodes_per_engine, slurm.node_name, port, os.getpid())
    _exec(engine_command(cfg, task, port, dist_init, layout.nodes_per_engine))
    return 1  # not reached


def router(cfg, slurm: SlurmEnv) -> int:
    rdv = Rendezvous(_run_dir(cfg), slurm.job_id, slurm.restart_count)
    names = [engine_name(i) for i in range(cfg.engine.num_engines)]
    logger.info("router on %s waiting for %d engine address(es)", slurm.node_name, len(names))
    addrs = rdv.wait_for(names, cfg.cluster.rendezvous_timeout_s)
    port = JobPorts.for_job(slurm.job_id).router
    rc = cfg.router
    # The same flags as miles.engines.process.launch_router, but exec'd: this task IS the router.
    cmd = [sys.executable, "-m", "miles.engines.router", "--host", BIND_HOST, "--port", str(port),
           "--policy", rc.policy, "--health-check-interval-s", str(rc.health_check_interval_s),
           "--health-check-failure-threshold", str(rc.health_check_failure_threshold),
           "--max-retries", str(rc.max_retries), "--request-timeout-s", str(rc.request_timeout_s),
           "--worker-urls", *(addrs[n].url for n in names)]
    rdv.publish(ROUTER, slurm.node_addr(), port, node=slurm.node_name)
    _exec(cmd)
    return 1  # not reached


def _join_env(slurm: SlurmEnv, bootstrap: str, cfg=None) -> dict[str, str]:
    """The env:// variables of this task, in the planned rank order when cfg asks for it; exported."""
    env = dist_env_from_mpi(slurm) if bootstrap == "mpi" else dist_env_from_slurm(slurm)
    if cfg is not None and cfg.cluster.rank_order == "topology":
        procid_rank = env["RANK"]
        env, found = apply_rank_map(cfg, slurm, env, _run_dir(cfg))
        logger.info("rank %s (task %s): domains from %s", env["RANK"], procid_rank, found.source)
    os.environ.update(env)
    return env


def trainer(cfg, slurm: SlurmEnv, bootstrap: str) -> int:
    missing = unsupported_features(cfg)
    if missing:
        raise ConfigError("this recipe needs pieces Miles does not have yet:\n  - " + "\n  - ".join(missing))
    _check_platform(cfg)
    env = _join_env(slurm, bootstrap, cfg)  # before torch.distributed (miles.driver.train) starts
    os.environ[ROLE_ENV] = "trainer"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank = int(env["RANK"])
    Rendezvous(_run_dir(cfg), slurm.job_id, slurm.restart_count).publish(
        trainer_name(rank), slurm.node_addr(), int(env["MASTER_PORT"]), node=slurm.node_name)
    logger.info("trainer rank %d of %s on %s, pid %d, master %s:%s (bootstrap %s)", rank, env["WORLD_SIZE"],
                slurm.node_name, os.getpid(), env["MASTER_ADDR"], env["MASTER_PORT"], bootstrap)
    from miles.checkpoint.preemption import EXIT_PREEMPTED, Preempted
    from miles.driver import train

    try:
        train(cfg)  # stop requests: the batch script's <run_dir>/PREEMPT file
    except Preempted as exc:
        logger.info("trainer rank %d: %s; exiting with %d", rank, exc, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    logger.info("trainer rank %d finished", rank)
    return 0


def dist_check(slurm: SlurmEnv, bootstrap: str, cfg=None) -> int:
    """all_reduce(rank + 1) over the world; prints one line per rank; 0 if the sum is n(n+1)/2.
    With cfg, RANK follows its cluster.rank_order (the topology rank map, as for a trainer)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    env = _join_env(slurm, bootstrap, cfg)
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
    finally:
        dist.destroy_process_group()
    expected = world * (world + 1) / 2
    sys.stdout.write(f"dist-check rank={rank} world_size={world} local_rank={env['LOCAL_RANK']} "
                     f"master={env['MASTER_ADDR']}:{env['MASTER_PORT']} bootstrap={bootstrap} "
                     f"all_reduce={value.item():g} expected={expected:g} node={slurm.node_name}\n")
    sys.stdout.flush()
    return 0 if value.item() == expected else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m miles.launchers.role", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("role", choices=["plan", "engine", "router", "trainer", "dist-check"])
    ap.add_argument("--recipe", help="recipe name or YAML path (every role; optional for dist-check)")
    ap.add_argument("--bootstrap", choices=["env", "mpi"], help="trainer/dist-check: overrides cluster.bootstrap")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    slurm = SlurmEnv()
    kind = None if args.role in ("plan", "dist-check") else args.role
    role = None
    if kind and "SLURM_PROCID" in slurm.env:
        role = Role(kind, 0 if kind == "router" else slurm.procid, slurm.restart_count)
    _setup_logging(role, slurm)
    try:
        from miles.config.loader import load_config

        if args.role == "dist-check":
            cfg = load_config(args.recipe, overrides) if args.recipe else None
            return dist_check(slurm, args.bootstrap or (cfg.cluster.bootstrap if cfg else "env"), cfg)
        if not args.recipe:
            raise ConfigError(f"role {args.role} needs --recipe")
        cfg = load_config(args.recipe, overrides)
        if args.role == "plan":
            return plan(cfg, slurm)
        if args.role == "engine":
            return engine(cfg, slurm)
        if args.role == "router":
            return router(cfg, slurm)
        return trainer(cfg, slurm, args.bootstrap or cfg.cluster.bootstrap)
    except ConfigError as exc:
        logger.error("error: %s", exc)
        return EXIT_CONFIG
    except Exception:  # process boundary: log the traceback so the task's log says why it died
        logger.exception("%s failed", role.label if role else args.role)
        return 1


if __name__ == "__main__":
    sys.exit(main())
