"""Configuration of R3 (rollout routing replay) for MoE runs."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingReplayConfig:
    """Record the engine's expert choices at rollout and replay them in the trainer's forward."""

    enabled: bool = False
    """Turn R3 on (MoE models only): engines start with --enable-return-routed-experts, requests
    ask for the routing, the rollout client writes it to the node-local dump store, and every
    trainer forward (log-probs, reference, training, recomputation) replays it."""
    dump_dir: str | None = None
    """Node-local folder of the routing dumps (HDF5, one file per RL step). Default:
    $SLURM_TMPDIR/miles-r3 under Slurm, else a per-job folder under the temp dir."""
    keep_dumps: bool = False
    """Keep each step's dump after it was trained (for inspection); by default it is deleted."""
