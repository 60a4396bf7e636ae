"""Render sbatch/miles-het.sbatch for one config: its #SBATCH lines and its run-settings block.

    text = render_het_script(cfg, "quickstart", ["run.num_steps=2"], submitit_folder="runs/quickstart/submitit")

The template stays the single source of the job's logic; rendering only (1) replaces every
`#SBATCH` line of the template by the lines of the config's `cluster` section and layout, and
(2) replaces the block between the "run settings" markers by literal values. The output has no
dates or absolute paths that the config does not contain, so it is golden-file tested.
"""

import json
import re
import shlex
from pathlib import Path

from miles.cluster.job_placement import submit_placement
from miles.cluster.platforms import get_platform
from miles.cluster.roles import HetLayout
from miles.config.loader import run_dir
from miles.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parents[1] / "sbatch" / "miles-het.sbatch"
"""The default template: sbatch/miles-het.sbatch in the Miles source tree."""
_PLAIN = re.compile(r"[A-Za-z_/.][\w./-]*")
SETTINGS_BEGIN = "# ---- run settings (miles-submit rewrites this block) ----"
SETTINGS_END = "# ---- end of run settings ----"
PLATFORM_BEGIN = "# ---- platform preset (miles-submit inlines sbatch/platforms/<platform>.sh here) ----"
PLATFORM_END = "# ---- end of platform preset ----"
RENDERED_NOTE = "# Rendered by miles-submit from {name}: edit the template (or pass --template), not this copy."


def submitit_folder(cfg) -> str:
    """Where submitit keeps the job's pickles and batch logs: <run_dir>/submitit (as the config writes it)."""
    return str(run_dir(cfg) / "submitit")


def sbatch_lines(cfg, layout: HetLayout, submitit_dir: str | None) -> list[str]:
    """The #SBATCH lines: group 0 (with the job-wide options), `hetjob`, group 1."""
    c = cfg.cluster
    common = [f"--{key}={value}" for key, value in (("partition", c.partition), ("account", c.account),
                                                     ("qos", c.qos), ("time", c.time), ("constraint", c.constraint))
              if value]
    common += ["--exclusive"] if c.exclusive else []
    gpus = [f"--gpus-per-node={layout.gpus_per_node}"] if layout.gpus_per_node else []
    group0 = [f"--job-name={cfg.run.name}", f"--nodes={layout.nodes_rollout}",
              f"--ntasks-per-node={layout.engine_tasks_per_node}", *gpus, *common]
    if submitit_dir is not None:  # submitit's log paths, so job.stdout()/job.stderr() work
        group0 += [f"--output={submitit_dir}/%j_0_log.out", f"--error={submitit_dir}/%j_0_log.err"]
    ck = cfg.checkpoint  # preemption: the signal goes to the batch shell (B:), which asks the trainer to save
    group0 += [f"--signal=B:{ck.preempt_signal}@{ck.preempt_grace_s}", "--requeue", "--open-mode=append"]
    group0 += [line.strip() for line in c.sbatch_extra]
    group1 = [f"--nodes={layout.nodes_train}", f"--ntasks-per-node={layout.trainers_per_node}", *gpus, *common]
    placement, _ = submit_placement(cfg)  # --segment: each segment lands inside one topology/block block
    if placement is not None:
        group0 += [f"--segment={placement.rollout_segment}"] if placement.rollout_segment else []
        group1 += [f"--segment={placement.train_segment}"] if placement.train_segment else []
    if c.imex_channel_per_segment:
        group0 += ["--network=unique-channel-per-segment"]
        group1 += ["--network=unique-channel-per-segment"]
    return [*(f"#SBATCH {o}" for o in group0), "#SBATCH hetjob", *(f"#SBATCH {o}" for o in group1)]


def settings_block(cfg, recipe: str, overrides: list[str], submitit_dir: str | None) -> list[str]:
    """Literal values for the template's run-settings block."""
    c = cfg.cluster
    container = []
    if c.container_image:
        container = [f"--container-image={shlex.quote(c.container_image)}", '--container-mounts="$SLURM_SUBMIT_DIR"',
                     '--container-workdir="$SLURM_SUBMIT_DIR"']
    wrap = ["apptainer", "exec", "--nv", "--bind", '"$SLURM_SUBMIT_DIR"', shlex.quote(c.apptainer_image)] \
        if c.apptainer_image else []
    return [
        SETTINGS_BEGIN,
        f"RECIPE={shlex.quote(recipe)}",
        f"OVERRIDES=({' '.join(shlex.quote(o) for o in overrides)})",
        f"CONTAINER=({' '.join(container)})",
        f"WRAP=({' '.join(wrap)})",
        f"SUBMITIT_FOLDER={shlex.quote(submitit_dir or '')}",
        SETTINGS_END,
    ]


def platform_block(cfg) -> list[str]:
    """The platform preset inlined (sbatch/platforms/<platform>.sh), or a note that there is none."""
    name = cfg.cluster.platform
    text = get_platform(name).preset_text().rstrip("\n").splitlines() if name else \
        ["# no platform preset (cluster.platform is empty)"]
    return [PLATFORM_BEGIN, *text, PLATFORM_END]


def render_het_script(cfg, recipe: str, overrides: list[str], submitit_dir: str | None = None,
                      template: Path = TEMPLATE) -> str:
    """The het-job batch script of cfg (loaded from recipe + overrides), rendered from template."""
    try:
        lines = template.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the het-job template {template}: {exc}") from exc
    try:
        first_sbatch = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
        begin, end = lines.index(SETTINGS_BEGIN), lines.index(SETTINGS_END)
    except (StopIteration, ValueError):
        raise ConfigError(f"{template} is not a Miles het-job template: it needs #SBATCH lines and the "
                          f"{SETTINGS_BEGIN!r} ... {SETTINGS_END!r} block") from None
    try:
        pbegin, pend = lines.index(PLATFORM_BEGIN), lines.index(PLATFORM_END)
    except ValueError:
        raise ConfigError(f"{template} has no {PLATFORM_BEGIN!r} ... {PLATFORM_END!r} block") from None
    layout = HetLayout.from_config(cfg)
    head = [line for line in lines[:begin] if not line.startswith("#SBATCH")]
    insert_at = first_sbatch  # every line before the first #SBATCH is kept, so indices agree
    head[insert_at:insert_at] = [RENDERED_NOTE.format(name=template.name), *sbatch_lines(cfg, layout, submitit_dir)]
    body = (settings_block(cfg, recipe, overrides, submitit_dir) + lines[end + 1:pbegin]
            + platform_block(cfg) + lines[pend + 1:])
    return "\n".join(head + body) + "\n"


def describe_layout(cfg) -> str:
    """Two lines: what each het group runs."""
    lay = HetLayout.from_config(cfg)
    gpus = f"{lay.gpus_per_engine} GPU(s) each" if lay.gpus_per_engine else "CPU"
    span = f", {lay.nodes_per_engine} nodes each" if lay.nodes_per_engine > 1 else ""
    return (f"het-group 0 (rollout): {lay.nodes_rollout} node(s), {lay.engine_tasks_per_node} engine task(s) per node: "
            f"{lay.num_engines} {cfg.engine.kind} engine(s) ({gpus}{span}) + the router\n"
            f"het-group 1 (train):   {lay.nodes_train} node(s) x {lay.trainers_per_node} trainer rank(s) = "
            f"world size {lay.train_tasks}, bootstrap {cfg.cluster.bootstrap}, "
            f"{lay.gpus_per_node or 'no'} GPU(s) per node")


def flag_overrides(**values) -> list[str]:
    """Overrides `cluster.<key>=<value>` for the given values that are not None; strings that YAML could
    read as something else ("04:00:00", "null") are JSON-quoted, which is valid YAML."""
    out = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            plain = _PLAIN.fullmatch(value) and value.lower() not in ("true", "false", "null")
            text = value if plain else json.dumps(value)
        elif isinstance(value, (list, tuple)):
            text = json.dumps(list(value))
        else:
            text = str(value)
        out.append(f"cluster.{key}={text}")
    return out
