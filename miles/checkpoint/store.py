"""Save and resume everything a bit-identical continuation needs (ARCHITECTURE §5).

    step_00000012/
      dist/                 megatron dist-checkpoint (torch_dist): model + optimizer (Adam moments,
                            step; fp32 main params in bf16), reshardable across TP layouts
      trainer_state.json    RL step, optimizer steps, lr-scheduler state, parallel layout, precision,
                            model shape (checked on load)
      rng/rank_{r}.pt       RNG states of rank r (python, numpy, torch, CUDA, megatron tracker)
      rl_state.json         what the driver passed: data cursor, samples not yet trained on, ...
      config.yaml           the resolved run config
      manifest.json         size + sha256 of every file above; written last (miles.checkpoint.manifest)

`save_checkpoint` and `load_checkpoint` are collective over all trainer ranks, which must share
the checkpoint folder (a shared filesystem on a cluster). The commit protocol, `latest` and
keep-last-N live in miles.checkpoint.layout.

Resharding: the model and optimizer load into any TP size (megatron resharding, non-distributed
optimizer). RNG files are per rank: with the same world size and TP size each rank restores its
own; otherwise every rank restores rank 0's python/numpy/torch streams (identical on all ranks
of one pipeline stage, see miles.trainer.parallel) and megatron's per-TP-rank tracker streams
keep their fresh seeding from init_parallel, with a warning (dropout masks then differ from an
uninterrupted run; nothing else does).

Caveat (megatron's torch_dist writer): the first save in a process starts a `multiprocessing`
Manager with the *spawn* context (~3 s on CPU), which re-imports the main module: the script
that runs the trainer must guard its entry point with `if __name__ == "__main__":`, or the save
hangs.
"""

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from miles.checkpoint import ranks, rng
from miles.checkpoint.layout import commit, resume_candidates, tmp_dir
from miles.atomic_file import atomic_write_text
from miles.checkpoint.manifest import read_manifest, sha256_text, verify
from miles.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT = "miles-checkpoint-1"
"""Value of trainer_state.json's "format"."""
_SHARDED_METADATA = {"chained_optim_avoid_prefix": True}
# HF config fields that must match between the checkpoint and the resuming model.
_MODEL_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts",
                 "num_experts_per_tok", "tie_word_embeddings")
_RESTART_HINT = ("resume with the model.path and trainer settings of the saved run (the TP size may differ), "
                 "or start from model.path with checkpoint.resume=false or a fresh checkpoint.dir")


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist (all damaged); the message lists what was found."""


def save_checkpoint(ckpt_root: str | Path, step: int, actor, rl_state: dict[str, Any], config_yaml: str,
                    keep_last: int | None = None) -> Path:
    """Collective: save the actor (model, optimizer, scheduler), every rank's RNG, `rl_state` (JSON-
    serialisable; rank 0's is stored) and `config_yaml` as checkpoint `step`; return its folder.

    Commits atomically (step_N.tmp/ -> step_N/, manifest last, then `latest`) and keeps the
    `keep_last` newest checkpoints (None = all). Must be called on every trainer rank with the
    same `step`. An existing step_N/ (e.g. damaged, the run resumed before it) is replaced.
    """
    began = time.perf_counter()
    rng_state = rng.capture()  # first: nothing below may consume random numbers before it is taken
    try:
        rl_text = json.dumps(rl_state, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"rl_state must be JSON-serialisable (convert samples with Sample.to_dict()): {e}") from e
    root = Path(ckpt_root)
    tmp = tmp_dir(root, step)
    _on_rank0(lambda: _fresh_dir(tmp), f"creating {tmp}")

    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded_state_dict(actor, _SHARDED_METADATA, is_loading=False), str(tmp / "dist"),
                            sharded_strategy=("torch_dist", 1))
    rng.save(tmp / "rng" / f"rank_{ranks.rank()}.pt", rng_state)
    trainer_state = {
        "format": FORMAT, "step": step, "num_optimizer_steps": actor.num_optimizer_steps,
        "scheduler": actor.scheduler.state_dict(), "sharded_metadata": _SHARDED_METADATA,
        "layout": _layout(actor), "bf16": actor.cfg.bf16, "model": _model_fields(actor),
    }

    def write_rank0_files() -> None:
        atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1) + "\n")
        atomic_write_text(tmp / "rl_state.json", rl_text + "\n")
        atomic_write_text(tmp / "config.yaml", config_yaml)

    _on_rank0(write_rank0_files, f"writing the RL state into {tmp}")
    final = commit(root, step, sha256_text(config_yaml), keep_last)
    seconds = time.perf_counter() - began
    megabytes = _megabytes(final)
    logger.info("saved checkpoint %s (step %d, %.1f MB) in %.2f s (%.1f MB/s)", final, step, megabytes, seconds,
                megabytes / seconds)
    return final


def load_checkpoint(ckpt_root: str | Path, actor) -> tuple[int, dict[str, Any]] | None:
    """Collective: restore the newest intact checkpoint under `ckpt_root` into `actor` (model,
    optimizer, scheduler) and this rank's RNG; return (step, rl_state), or None when there is none.

    Candidates are tried from `latest` backwards; a checkpoint whose files fail the manifest
    check is skipped with a warning naming each bad file. Raises CheckpointError when every
    checkpoint is damaged, ConfigError when an intact one does not fit this model.
    """
    root = Path(ckpt_root)
    candidates = ranks.broadcast_from_0(resume_candidates(root) if ranks.rank() == 0 else None)
    if not candidates:
        logger.info("no checkpoint in %s: starting fresh", root)
        return None
    damaged: list[Path] = []
    for ckpt in candidates:
        began = time.perf_counter()
        problems = _verify_everywhere(ckpt)
        if problems:
            logger.warning("checkpoint %s is damaged, skipping it:\n  %s", ckpt, "\n  ".join(problems))
            damaged.append(ckpt)
            continue
        verified = time.perf_counter()
        step, rl_state = _load_verified(ckpt, actor)
        if damaged:
            logger.warning("resuming from step %d (%s) instead of %s", step, ckpt.name,
                           ", ".join(p.name for p in damaged))
        done = time.perf_counter()
        megabytes = _megabytes(ckpt)
        logger.info("resumed from checkpoint %s (step %d, %.1f MB): checksums %.2f s, load %.2f s (%.1f MB/s)",
                    ckpt, step, megabytes, verified - began, done - verified, megabytes / (done - verified))
        return step, rl_state
    raise CheckpointError(
        f"every checkpoint in {root} is damaged ({', '.join(p.name for p in damaged)}; see the warnings above). "
        "Restore a good copy, or start from model.path with checkpoint.resume=false or a fresh checkpoint.dir")


def read_rl_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """rl_state.json of a checkpoint folder (no verification, no model needed; for tools and tests)."""
    return json.loads((Path(ckpt_dir) / "rl_state.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------- internals


def _sharded_state_dict(actor, metadata: dict, is_loading: bool) -> dict:
    metadata = dict(metadata)  # megatron adds process groups to it
    module = actor.model.module  # under megatron's DDP wrapper
    model_sd = module.sharded_state_dict(metadata=metadata)
    return {"model": model_sd,
            "optimizer": actor.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)}


def _layout(actor) -> dict[str, int]:
    p = actor.parallel
    return {"world_size": p.world_size, "tp_size": p.tp_size, "pp_size": p.pp_size, "dp_size": p.dp_size}


def _model_fields(actor) -> dict[str, Any]:
    return {name: getattr(actor.hf_config, name, None) for name in _MODEL_FIELDS}


def _fresh_dir(tmp: Path) -> None:
    if tmp.exists():
        logger.warning("removing %s left by an unfinished save", tmp)
        shutil.rmtree(tmp)
    (tmp / "dist").mkdir(parents=True)
    (tmp / "rng").mkdir()


def _on_rank0(fn, what: str) -> None:
    """Run fn on rank 0 only; an error there is raised on every rank (no rank is left waiting)."""
    error, cause = None, None
    if ranks.rank() == 0:
        try:
            fn()
        except Exception as e:  # rank boundary: re-raised below on every rank, not swallowed
            logger.exception("%s failed", what)
            error, cause = f"{what} failed on rank 0: {e}", e
    error = ranks.broadcast_from_0(error)
    if error is not None:
        raise RuntimeError(error) from cause


def _verify_everywhere(ckpt: Path) -> list[str]:
    """verify() with the hashing shared over ranks; the same problem list on every rank."""
    mine = verify(ckpt, ranks.rank(), ranks.world_size())
    return list(dict.fromkeys(p for part in ranks.gather_all(mine) for p in part))


def _load_verified(ckpt: Path, actor) -> tuple[int, dict[str, Any]]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    _check_compatible(ckpt, state, actor)
    sharded = _sharded_state_dict(actor, state["sharded_metadata"], is_loading=True)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt / "dist"))
        actor.model.module.load_state_dict(loaded["model"])
        actor.optimizer.load_state_dict(loaded["optimizer"])
    except (CheckpointingException, KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot load {ckpt / 'dist'} into this model: {type(e).__name__}: {e}\n"
                          f"Fix: {_RESTART_HINT}") from e
    actor.scheduler.num_steps = 0  # megatron's load_state_dict *adds* the saved step count
    actor.scheduler.load_state_dict(state["scheduler"])
    assert actor.num_optimizer_steps == state["num_optimizer_steps"], (actor.num_optimizer_steps, state)
    _restore_rng(ckpt, state["layout"], actor)
    rl_state = read_rl_state(ckpt)
    manifest_step = read_manifest(ckpt)["step"]
    assert manifest_step == state["step"], (manifest_step, state["step"])
    return state["step"], rl_state


def _check_compatible(ckpt: Path, state: dict, actor) -> None:
    if state.get("format") != FORMAT:
        raise ConfigError(f"{ckpt}/trainer_state.json has format {state.get('format')!r}, this code reads "
                          f"{FORMAT!r}. Fix: {_RESTART_HINT}")
    saved, ours = state["model"], _model_fields(actor)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {ours[k]!r}" for k in ours if saved.get(k) != ours[k]]
    if state["bf16"] != actor.cfg.bf16:
        diffs.append(f"trainer.bf16: checkpoint {state['bf16']}, this run {actor.cfg.bf16}")
    if diffs:
        raise ConfigError(f"checkpoint {ckpt} was saved for a different model:\n  " + "\n  ".join(diffs) +
                          f"\nFix: {_RESTART_HINT}")


def _restore_rng(ckpt: Path, saved_layout: dict[str, int], actor) -> None:
    ours = _layout(actor)
    if saved_layout == ours:
        rng.restore(rng.load(ckpt / "rng" / f"rank_{ranks.rank()}.pt"))
        return
    logger.warning("checkpoint %s was saved with layout %s, this run has %s: every rank restores rank 0's "
                   "python/numpy/torch RNG states; megatron's per-TP-rank RNG streams keep their fresh seeding",
                   ckpt.name, saved_layout, ours)
    rng.restore(rng.load(ckpt / "rng" / "rank_0.pt"), with_tracker=False)


def _megabytes(ckpt: Path) -> float:
    return sum(entry["size"] for entry in read_manifest(ckpt)["files"].values()) / 1e6
