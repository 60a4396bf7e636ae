"""Run the topology planner on synthetic clusters and print a markdown table of EP cross-domain shares.

    python tools/simulate_placement.py            # the table in docs/topology.md

Clusters: 8 to 64 GB200/GB300 NVL72 racks (18 nodes x 4 GPUs per NVLink domain) and 64 to 512 MI355X
nodes (8 GPUs per xGMI domain). Layouts: GLM-5 from configs/glm5.yaml's plan (TP4 PP4 CP2 EP32, one
64-GPU SGLang engine shape) and a DeepSeek-V3-like one (TP2 PP16 EP64, 64-GPU engines). Half the domains
go to the rollout engines, the other half to the trainer, whose DP is the largest that fits them;
the share is of trainer EP all-to-all pairs (uniform traffic), naive = node-by-node order, rollout first.
Planning time is the best of 3 calls (the dev machine is shared, so single calls are noisy).
"""

import argparse
import math
import time

from miles.cluster.planner import crossing_share, naive_placement, plan_placement
from miles.cluster.topology import ClusterShape, EngineLayout, TrainerLayout
from miles.config.loader import load_config


def layouts() -> dict[str, tuple[TrainerLayout, EngineLayout]]:
    """Trainer layout (dp=1, scaled later) and engine shape of each recipe."""
    cfg = load_config("glm5")
    ep_span = cfg.plan.expert_parallel * cfg.plan.expert_tensor_parallel
    tp_cp = cfg.trainer.tensor_model_parallel_size * cfg.plan.context_parallel
    glm = TrainerLayout(tp=cfg.trainer.tensor_model_parallel_size, pp=cfg.plan.pipeline_parallel,
                        cp=cfg.plan.context_parallel, ep=cfg.plan.expert_parallel,
                        dp=math.lcm(ep_span, tp_cp) // tp_cp,  # the smallest DP with ep * etp | tp * cp * dp
                        etp=cfg.plan.expert_tensor_parallel)
    gpe = cfg.cluster.gpus_per_engine
    return {"GLM-5 (TP4 PP4 CP2 EP32)": (glm, EngineLayout(tp=gpe, ep=gpe, dp=gpe)),
            "DeepSeek-V3-like (TP2 PP16 EP64)": (TrainerLayout(tp=2, pp=16, ep=64, dp=32),
                                                EngineLayout(tp=64, ep=64, dp=64))}


def sized(cluster: ClusterShape, trainer: TrainerLayout, engine: EngineLayout):
    """Engines on half the GPUs, the trainer's DP scaled (in steps of its smallest valid DP) into the rest."""
    half = cluster.num_gpus // 2
    num_engines = max(1, half // engine.tp)
    rest = cluster.num_gpus - num_engines * engine.tp
    # DP step keeps ep * etp | tp * cp * dp and whole chunks of domains where they fit.
    scale = max(1, rest // trainer.world_size)
    while scale > 1 and (trainer.world_size * scale) % cluster.gpus_per_node:
        scale -= 1
    grown = TrainerLayout(tp=trainer.tp, pp=trainer.pp, cp=trainer.cp, ep=trainer.ep, dp=trainer.dp * scale,
                          etp=trainer.etp)
    return grown, EngineLayout(tp=engine.tp, ep=engine.ep, dp=engine.dp, num_engines=num_engines)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    clusters = [(f"{r} x NVL72 ({r * 72} GPUs)", ClusterShape(r * 18, 4, domain_nodes=18)) for r in (8, 16, 32, 64)]
    clusters += [(f"{n} x MI355X ({n * 8} GPUs)", ClusterShape(n, 8, domain_nodes=1, fabric="xGMI"))
                 for n in (64, 128, 256, 512)]
    print("| cluster | layout | trainer world | engines | EP cross-domain naive | EP cross-domain planned "
          "| engine cross-domain naive / planned | --segment rollout / trainer | planning time (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cname, cluster in clusters:
        for lname, (trainer0, engine0) in layouts().items():
            if cluster.num_gpus < 2 * trainer0.world_size:
                continue  # the layout's smallest trainer does not fit half the cluster
            trainer, engine = sized(cluster, trainer0, engine0)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                plan = plan_placement(cluster, trainer, engine)
                times.append(time.perf_counter() - start)
            ms = min(times) * 1e3
            naive = naive_placement(cluster, trainer, engine)
            print(f"| {cname} | {lname} | {trainer.world_size} (dp={trainer.dp}) | {engine.num_engines} x {engine.tp} "
                  f"| {crossing_share(naive, 'ep'):.1%} | {crossing_share(plan, 'ep'):.1%} "
                  f"| {crossing_share(naive, 'engine'):.1%} / {crossing_share(plan, 'engine'):.1%} "
                  f"| {plan.rollout_segment} / {plan.train_segment} | {ms:.1f} |")


if __name__ == "__main__":
    main()
