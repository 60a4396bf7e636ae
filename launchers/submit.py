"""`miles-submit`: run a recipe as a Slurm heterogeneous job (or locally), built on submitit.

    miles-submit --recipe glm5 --dry-run                      # print the het-job script, config, memory estimate
    miles-submit --recipe glm5 --platform gb200 --dry-run     # the same job on GB200 NVL72: presets, --segment
    miles-submit --recipe quickstart run.num_steps=2 --follow # submit, tail the logs, exit with the job's state
    miles-submit --recipe qwen3-small --partition gpu --time 04:00:00 --gpus-per-node 8 model.path=/ckpt/Qwen3-1.7B
    miles-submit --recipe quickstart --executor local         # the same run on this machine (python -m miles.driver)

Every Slurm flag is an override of the `cluster` section (--partition P == cluster.partition=P), so
the resolved config in the run directory records how the job was submitted. Bad input stops before
anything reaches Slurm: an unknown recipe lists the known ones, an unknown key lists the valid keys,
a feature Miles lacks is named, more GPUs per node than the partition has is caught, and sbatch's
own error is shown verbatim. Exit status: 0 ok, 2 bad input, 1 the job (or sbatch) failed.
See docs/slurm.md.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from miles.cluster.job_placement import describe_placement
from miles.cluster.memory import estimate_memory
from miles.cluster.plan import unsupported_features
from miles.cluster.platforms import PLATFORMS, get_platform
from miles.cluster.roles import HetLayout
from miles.config.loader import config_to_yaml, load_config, run_dir
from miles.errors import ConfigError
from miles.launchers.het_script import (TEMPLATE, describe_layout, flag_overrides, render_het_script,
                                        submitit_folder)

logger = logging.getLogger("miles.launchers.submit")

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
FOLLOW_POLL_S = 1.0


def build_parser() -> argparse.ArgumentParser:
    """The CLI surface; every argument not listed here is an override `section.key=value`."""
    ap = argparse.ArgumentParser(prog="miles-submit", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                 epilog="Overrides: section.key=value, applied after the recipe; flags after them.")
    ap.add_argument("--recipe", required=True, help="recipe name (configs/<name>.yaml, $MILES_CONFIG_DIR) or YAML path")
    ap.add_argument("--dry-run", action="store_true", help="print the het-job script, resolved config and memory "
                    "estimate; touch nothing")
    ap.add_argument("--executor", choices=["slurm", "local"], default="slurm",
                    help="slurm: submit the het job; local: run the driver here with the local executor")
    ap.add_argument("--follow", action="store_true", help="tail the job's logs until it ends; exit with its state")
    ap.add_argument("--template", type=Path, default=TEMPLATE, help="het-job template (default sbatch/miles-het.sbatch)")
    slurm = ap.add_argument_group("Slurm (overrides of the cluster section)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--time", help="time limit, sbatch syntax (04:00:00)")
    slurm.add_argument("--constraint")
    slurm.add_argument("--exclusive", action="store_true", default=None)
    box = slurm.add_mutually_exclusive_group()
    box.add_argument("--container-image", help="run every step in this image through pyxis")
    box.add_argument("--apptainer", metavar="IMAGE", help="run every step through `apptainer exec --nv IMAGE`")
    slurm.add_argument("--sbatch-extra", action="append", metavar="LINE", help="an extra sbatch option, repeatable: --sbatch-extra=--mail-type=END")
    slurm.add_argument("--nodes-rollout", type=int)
    slurm.add_argument("--nodes-train", type=int)
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--bootstrap", choices=["env", "mpi"], help="trainer rendezvous: env:// or mpi4py")
    slurm.add_argument("--platform", choices=list(PLATFORMS), help="platform preset (sbatch/platforms/<name>.sh) "
                       "= cluster.platform; rescales the recipe's nodes to the platform's GPUs per node")
    slurm.add_argument("--imex-channel-per-segment", action="store_true", default=None,
                       help="one IMEX channel per --segment (--network=unique-channel-per-segment, Slurm 25.11+)")
    return ap


def _overrides(args, user: list[str]) -> list[str]:
    extra = [line.removeprefix("#SBATCH").strip() for line in args.sbatch_extra] if args.sbatch_extra else None
    return user + flag_overrides(
        partition=args.partition, account=args.account, qos=args.qos, time=args.time, constraint=args.constraint,
        exclusive=args.exclusive, container_image=args.container_image, apptainer_image=args.apptainer,
        sbatch_extra=extra, nodes_rollout=args.nodes_rollout, nodes_train=args.nodes_train,
        gpus_per_node=args.gpus_per_node, bootstrap=args.bootstrap)


def platform_overrides(cfg, name: str, args) -> list[str]:
    """cluster.platform=NAME, plus the node counts rescaled to the platform's GPUs per node, so the recipe's
    GPU counts stay (glm5: 16 x 8 train GPUs -> 32 x 4 on gb200). Flags the user gave are never changed."""
    p, c = get_platform(name), cfg.cluster
    values: dict = {"platform": name}
    if c.gpus_per_node and c.gpus_per_node != p.gpus_per_node and args.gpus_per_node is None:
        if c.trainers_per_node:
            raise ConfigError(f"--platform {name} has {p.gpus_per_node} GPUs per node but the recipe sets "
                              f"cluster.trainers_per_node={c.trainers_per_node}; pass --gpus-per-node, --nodes-rollout, "
                              f"--nodes-train and cluster.trainers_per_node yourself")
        values["gpus_per_node"] = p.gpus_per_node
        for key, flag in (("nodes_rollout", args.nodes_rollout), ("nodes_train", args.nodes_train)):
            gpus = getattr(c, key) * c.gpus_per_node
            if flag is None:
                if gpus % p.gpus_per_node:
                    raise ConfigError(f"cluster.{key}={getattr(c, key)} x {c.gpus_per_node} GPUs does not fill whole "
                                      f"{name} nodes of {p.gpus_per_node} GPUs; pass --{key.replace('_', '-')}")
                values[key] = gpus // p.gpus_per_node
    return flag_overrides(**values)


def memory_report(cfg) -> str:
    """The per-GPU memory estimate of the recipe's plan, or why there is none."""
    if not cfg.plan.declared:
        return "no memory estimate: the recipe declares no plan (plan.num_layers = 0)"
    world = HetLayout.from_config(cfg).train_tasks
    est = estimate_memory(cfg.plan, tp=cfg.trainer.tensor_model_parallel_size, world_size=world, bf16=cfg.trainer.bf16)
    return est.table()


def support_report(cfg) -> str:
    missing = unsupported_features(cfg)
    if not missing:
        return "runnable: every piece of the plan is supported"
    return "a real run stops before allocating anything; missing:\n" + "\n".join(f"  - {m}" for m in missing)


def dry_run(cfg, recipe: str, overrides: list[str], template: Path) -> str:
    """Everything --dry-run prints (deterministic: golden-file tested)."""
    script = render_het_script(cfg, recipe, overrides, submitit_folder(cfg), template)
    sections = [("het-job script (sbatch)", script.rstrip("\n")), ("layout", describe_layout(cfg)),
                ("placement", describe_placement(cfg)), ("memory", memory_report(cfg)), ("support", support_report(cfg)),
                ("resolved config", config_to_yaml(cfg).rstrip("\n"))]
    return "".join(f"# ==== {title} ====\n{body}\n" for title, body in sections)


def check_runnable(cfg) -> None:
    """Everything a real run needs that can be checked before submitting."""
    missing = unsupported_features(cfg)
    if missing:
        raise ConfigError("this recipe needs pieces Miles does not have yet (nothing was submitted):\n  - "
                          + "\n  - ".join(missing) + "\n--dry-run still renders the job and the memory estimate.")
    if not Path(cfg.model.path, "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r} holds no config.json; set model.path=<HF checkpoint "
                          f"folder on the shared filesystem>")


def submit(cfg, recipe: str, overrides: list[str], template: Path, follow: bool) -> int:
    """Submit through HetJobExecutor; with follow, tail the logs and return the job's exit status."""
    from miles.launchers.het_executor import HetJobExecutor, check_partition, het_job_result

    check_partition(cfg)
    folder = submitit_folder(cfg)
    script = render_het_script(cfg, recipe, overrides, folder, template)
    if not (cfg.cluster.container_image or cfg.cluster.apptainer_image):
        os.environ.setdefault("MILES_PYTHON", sys.executable)  # sbatch exports it to the job (--export=ALL)
    import submitit

    try:
        job = HetJobExecutor(folder, script).submit(het_job_result)
    except submitit.core.utils.FailedJobError as exc:  # sbatch's stderr was already printed verbatim
        sys.stderr.write(f"miles-submit: sbatch refused the job: {exc}\n")
        return EXIT_FAILED
    sys.stdout.write(f"submitted het job {job.job_id}: run dir {run_dir(cfg)}, batch log {job.paths.stdout}\n")
    sys.stdout.flush()
    return follow_job(job, run_dir(cfg)) if follow else 0


def follow_job(job, out_dir: Path) -> int:
    """Print new lines of the batch log and trainer rank 0's log until the job ends; 0 iff COMPLETED."""
    from miles.launchers.het_executor import TERMINAL_STATES, job_state

    offsets: dict[Path, int] = {}

    def pump() -> None:
        logs = [Path(job.paths.stdout), *sorted((out_dir / "logs").glob("train-0.r*.log"))]
        for path in logs:
            try:
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    chunk = f.read()
            except FileNotFoundError:
                continue
            offsets[path] = offsets.get(path, 0) + len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                line = line.rsplit("\r", 1)[-1]  # progress bars redraw with \r: keep the last state
                if line.strip():
                    sys.stdout.write(f"[{path.name}] {line}\n")
        sys.stdout.flush()

    state = None
    while True:
        pump()
        state = job_state(job.job_id)
        if state is None or state in TERMINAL_STATES:
            break
        time.sleep(FOLLOW_POLL_S)
    time.sleep(FOLLOW_POLL_S)
    pump()
    sys.stdout.write(f"miles-submit: job {job.job_id} ended: {state or 'UNKNOWN (no longer known to slurmctld)'}\n")
    return 0 if state == "COMPLETED" else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args, user_overrides = build_parser().parse_known_args(argv)
    unknown = [a for a in user_overrides if a.startswith("-") and "=" not in a]
    if unknown:
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = _overrides(args, user_overrides)
    try:
        cfg = load_config(args.recipe, overrides)
        if args.platform or args.imex_channel_per_segment:  # after the platform: the option needs one with IMEX
            overrides += platform_overrides(cfg, args.platform, args) if args.platform else []
            overrides += flag_overrides(imex_channel_per_segment=args.imex_channel_per_segment)
            cfg = load_config(args.recipe, overrides)
        if args.dry_run:
            sys.stdout.write(dry_run(cfg, args.recipe, overrides, args.template))
            return 0
        check_runnable(cfg)
        if args.executor == "local":  # the driver configures logging itself
            from miles.driver import main as driver_main

            return driver_main(["--recipe", args.recipe, *overrides])
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return submit(cfg, args.recipe, overrides, args.template, args.follow)
    except ConfigError as exc:
        sys.stderr.write(f"miles-submit: error: {exc}\n")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
