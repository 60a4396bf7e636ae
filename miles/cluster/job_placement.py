"""The topology planner applied to one run: --segment values at submit, the trainer's rank at run time.

    placement, why = submit_placement(cfg)     # the het job on whole domains of the configured size
    describe_placement(cfg)                    # the dry run's "placement" section
    env = apply_rank_map(cfg, slurm, env, run_dir)   # in a trainer task, before torch.distributed starts

At submit the cluster is modelled as the job's two groups, each on whole domains of its own
(cluster.domain_nodes or the platform's), so each group's --segment is the planner's: Slurm then puts
every segment inside one block. At run time the domains of the *allocated* trainer nodes are
discovered (miles.cluster.discovery), the planner orders the nodes so that TP and EP groups stay in
one domain, and each task takes the rank the rank map gives its (node, local GPU). Every task computes
the same plan from the same files, so no rank talks to another before torch.distributed starts.
"""

import logging
from collections.abc import Callable, Mapping

from miles.cluster.discovery import (Discovered, Runner, discover_cluster, exchange_identities, read_node_identity,
                                     subprocess_runner)
from miles.cluster.planner import Placement, crossing_share, plan_placement
from miles.cluster.roles import HetLayout
from miles.cluster.topology import ClusterShape, EngineLayout, TrainerLayout
from miles.errors import ConfigError

logger = logging.getLogger(__name__)


def _flag(args, name: str, default: int) -> int:
    """Integer value of `name VALUE` in an argument list (SGLang's --ep-size / --dp-size in engine.extra_args)."""
    args = list(args)
    return int(args[args.index(name) + 1]) if name in args[:-1] else default


def trainer_layout(cfg, world_size: int) -> TrainerLayout:
    """The trainer's parallel layout: TP from the trainer section, PP/CP/EP/ETP from the plan section."""
    return TrainerLayout.from_plan(cfg.plan, cfg.trainer.tensor_model_parallel_size, world_size)


def engine_layouts(cfg) -> tuple[EngineLayout, ...]:
    """The rollout engines' shape (one shape: cluster.gpus_per_engine GPUs each)."""
    tp = cfg.cluster.gpus_per_engine
    args = cfg.engine.extra_args
    return (EngineLayout(tp=tp, ep=_flag(args, "--ep-size", 1), dp=_flag(args, "--dp-size", 1),
                         num_engines=cfg.engine.num_engines),)


def submit_placement(cfg) -> tuple[Placement | None, str]:
    """The planned het job at submit time, or None and why there is none."""
    c, lay = cfg.cluster, HetLayout.from_config(cfg)
    dom = c.fabric_domain_nodes
    if not lay.gpus_per_node:
        return None, "no placement: a CPU-only job (cluster.gpus_per_node=0)"
    if lay.trainers_per_node != lay.gpus_per_node:
        return None, (f"no placement: cluster.trainers_per_node={lay.trainers_per_node} is not one trainer per GPU "
                      f"({lay.gpus_per_node})")
    if dom == 1:
        return None, (f"no --segment: every {c.fabric} domain is one node (cluster.domain_nodes / platform "
                      f"{c.platform or 'none'}), so Slurm's node choice cannot split a TP/EP group's fast fabric")
    whole = lambda n: -(-n // dom) * dom  # noqa: E731 - each group on whole domains of its own
    cluster = ClusterShape(whole(c.nodes_rollout) + whole(c.nodes_train), lay.gpus_per_node, domain_nodes=dom,
                           fabric=c.fabric)
    placement = plan_placement(cluster, trainer_layout(cfg, lay.train_tasks), engine_layouts(cfg))
    if (len(placement.rollout_nodes), len(placement.train_nodes)) != (c.nodes_rollout, c.nodes_train):
        return None, (f"no --segment: the layout needs {len(placement.rollout_nodes)} rollout and "
                      f"{len(placement.train_nodes)} train nodes, the config asks for {c.nodes_rollout} and "
                      f"{c.nodes_train}")
    return placement, ""


def describe_placement(cfg) -> str:
    """The dry run's placement section: the cluster model, --segment values, domains spanned, explanations."""
    c = cfg.cluster
    lines = [f"platform: {c.platform or 'none'}; {c.fabric} domains of {c.fabric_domain_nodes} node(s); "
             f"trainer rank order: {c.rank_order}"]
    placement, why = submit_placement(cfg)
    if placement is None:
        return "\n".join(lines + [why])
    dom = c.fabric_domain_nodes
    spans = lambda kind: max(placement.domains_spanned(kind), default=0)  # noqa: E731
    lines += [
        f"cluster model: {placement.cluster.num_nodes} nodes in {len(placement.cluster.domains)} domains of {dom} "
        f"nodes (each het group on whole domains of its own)",
        f"het-group 0 (rollout): --segment={placement.rollout_segment}; {len(placement.engine_map)} engine(s), "
        f"each spans at most {spans('engine')} domain(s)",
        f"het-group 1 (train):   --segment={placement.train_segment}; {len(placement.groups('tp'))} TP and "
        f"{len(placement.groups('ep'))} EP groups, each spans at most {max(spans('tp'), spans('ep'))} domain(s); "
        f"EP traffic across domains {100 * crossing_share(placement, 'ep'):.1f}%",
        "at run time the trainer ranks follow the domains discovered on the allocated nodes"
        if c.rank_order == "topology" else "at run time RANK = SLURM_PROCID (cluster.rank_order=slurm)",
    ]
    lines += [f"  - {line}" for line in placement.explanations]
    return "\n".join(lines)


def rank_of(placement: Placement, node_index: int, local_gpu: int) -> int:
    """The trainer rank the rank map gives to GPU `local_gpu` of node `node_index`."""
    try:
        return placement.rank_map.index((node_index, local_gpu))
    except ValueError:
        raise ConfigError(f"the rank map has no rank on node {node_index} GPU {local_gpu}: the step's tasks do not "
                          f"match the plan ({len(placement.rank_map)} ranks)") from None


def ranked_env(env: Mapping[str, str], placement: Placement, nodes: list[str], node: str,
               addr_of: Callable[[str], str]) -> dict[str, str]:
    """env:// variables with RANK from the rank map and MASTER_ADDR = the node of planned rank 0.

    `nodes` are the names behind the placement's node indices; LOCAL_RANK (the task's GPU) is kept.
    """
    local = int(env["LOCAL_RANK"])
    rank = rank_of(placement, nodes.index(node), local)
    master = nodes[placement.rank_map[0][0]]
    return {**env, "RANK": str(rank), "MASTER_ADDR": addr_of(master)}


def apply_rank_map(cfg, slurm, env: Mapping[str, str], run_dir: str, run: Runner = subprocess_runner,
                   addr_of: Callable[[str], str] | None = None) -> tuple[dict[str, str], Discovered]:
    """This trainer task's env:// variables in the planned rank order (cluster.rank_order=topology).

    The task with LOCAL_RANK 0 on each node publishes the node's identity (the first node also runs
    `scontrol show topology`, once per job); every task waits for all nodes, discovers the domains,
    plans the trainer alone on the allocated nodes, and looks up its rank.
    """
    nodes = slurm.het_group_nodes(1) if slurm.het_size else slurm.step_nodes()
    node, world = slurm.node_name, int(env["WORLD_SIZE"])
    if world % len(nodes):
        raise ConfigError(f"{world} trainer ranks on {len(nodes)} nodes: the rank map needs the same number per node")
    me = None
    if int(env["LOCAL_RANK"]) == 0:
        me = read_node_identity(slurm.env, node, run, with_scontrol=node == nodes[0])
    ids = exchange_identities(run_dir, slurm.job_id, slurm.restart_count, nodes, me, cfg.cluster.rendezvous_timeout_s)
    found = discover_cluster(nodes, world // len(nodes), ids, cfg.cluster.fabric_domain_nodes, cfg.cluster.fabric)
    placement = plan_placement(found.shape, trainer_layout(cfg, world))
    ordered = list(found.shape.node_names)
    out = ranked_env(env, placement, ordered, node, addr_of or slurm.node_addr)
    if out["RANK"] == "0":
        logger.info("rank map: domains from %s (%s); %s; trainer node order %s", found.source,
                    "; ".join(found.notes) or "first source", "; ".join(placement.explanations) or "no crossings",
                    ",".join(ordered[i] for i in placement.train_nodes))
    return out, found
