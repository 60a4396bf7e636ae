"""The RL loop. Read it top to bottom; every line is one step of docs/architecture.md §2.

    python -m miles.driver --recipe quickstart [section.key=value ...]

Runs in every trainer rank. Rank 0 is the controller: it starts the rollout group (local
executor: engines + router as processes), generates and scores rollouts, and broadcasts the
samples; all ranks train (Megatron) and take part in the weight export; rank 0 sends the
weights to the engines.
"""

import argparse
import logging
import os
import sys
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist

from miles.algo.advantages import compute_advantages
from miles.algo.kl import kl_estimate
from miles.checkpoint.preemption import EXIT_PREEMPTED, Preempted, StopRequest, TrainedSampleLog, pause_for_test
from miles.config.loader import load_config, run_dir, write_resolved_config
from miles.config.plugins import resolve_plugins
from miles.config.run_config import RunConfig
from miles.errors import ConfigError
from miles.launchers.local import LocalRollout
from miles.observability.metrics import MetricsLogger, NullMetricsLogger
from miles.observability.mismatch import train_infer_mismatch
from miles.observability.timers import PhaseTimer
from miles.rollout.client import RolloutClient
from miles.rollout.data_source import JsonlPromptSource
from miles.rollout.sample import Sample
from miles.trainer.sft import load_sft_samples, sft_batches
from miles.weight_sync.syncer import WeightSyncer

logger = logging.getLogger("miles.driver")


def train(cfg: RunConfig, stop: StopRequest | None = None) -> list[dict]:
    """Run cfg.run.num_steps RL steps; return the controller's metrics per step.

    A stop request (`stop`: signal flag or <run_dir>/PREEMPT) is honoured at the next step
    boundary: the step in flight finishes, a checkpoint is committed, and Preempted is raised.
    """
    from transformers import AutoTokenizer
    from tqdm import tqdm

    from miles.trainer.actor import MegatronActor
    from miles.trainer.parallel import init_parallel, teardown_parallel

    if not torch.cuda.is_available():
        from miles.trainer.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    else:  # NCCL's cuMem allocator breaks the weight-update group with SGLang (docs/gpu.md)
        os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
    parallel = init_parallel(tp_size=cfg.trainer.tensor_model_parallel_size,
                             ep_size=cfg.trainer.expert_model_parallel_size, seed=cfg.run.seed)
    controller = parallel.rank == 0
    out_dir = run_dir(cfg)
    if controller:
        write_resolved_config(cfg, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    plugins = resolve_plugins(cfg)
    dumps = _routing_dumps(cfg)
    actor = MegatronActor(cfg.model.path, cfg.trainer, cfg.algo, parallel,
                          routing_source=None if dumps is None else partial(_read_routing, dumps))
    metrics = MetricsLogger(out_dir) if controller else NullMetricsLogger()
    history: list[dict] = []
    stop = stop or StopRequest(out_dir)
    trained_log = TrainedSampleLog(out_dir)
    stopped: Preempted | None = None

    with (_rollout_group(cfg, out_dir) if controller else nullcontext()) as rollout:
        engine_urls = _broadcast(rollout.engine_urls if controller else None)
        # The address the engines reach this (source) rank at, for the weight-update group.
        sync = WeightSyncer(cfg.weight_sync, engine_urls, is_source=controller, run_dir=out_dir,
                            master_address=rollout.trainer_address if controller else "127.0.0.1")
        prompts, client = _rollout_side(cfg, tokenizer, plugins, rollout) if controller else (None, None)

        ckpt_root = cfg.checkpoint.resolve_dir(out_dir)
        start_step, rl_state = _resume(cfg, ckpt_root, actor)
        saved_at = start_step
        if controller:
            trained_log.rewind(start_step)
        if start_step:  # the engines started from model.path: give them the resumed weights
            if controller:
                prompts.load_state_dict(rl_state["data"])
            sync.push(actor.export_hf_weights(), f"step-{start_step}")
        elif cfg.sft.steps:
            _sft_warmup(cfg, actor, tokenizer, metrics)
            sync.push(actor.export_hf_weights(), "sft")

        for step in tqdm(range(start_step, cfg.run.num_steps), desc="rl steps", disable=not controller,
                         initial=start_step, total=cfg.run.num_steps):
            reason = stop.requested()
            if reason:  # a step boundary: the checkpoint holds whole steps only
                if step > saved_at:  # step 0: nothing to keep, the restart starts over
                    _save(cfg, ckpt_root, step, actor, prompts)
                stop.clear()
                stopped = Preempted(step, reason)
                break
            timer = PhaseTimer()
            with timer.phase("rollout"):
                pause_for_test("rollout", step, out_dir, stop)
                samples, rollout_metrics = _broadcast(
                    _collect_batch(cfg, client, prompts, _dump_writer(dumps, step, actor)) if controller else None)
            step_metrics = dict(rollout_metrics)
            with timer.phase("train"):
                pause_for_test("train", step, out_dir, stop)
                step_metrics |= _train_on(cfg, actor, samples)
            if controller:
                trained_log.append(step, [s.sample_id for s in samples])
            with timer.phase("sync"):
                pause_for_test("sync", step, out_dir, stop)
                step_metrics |= sync.push(actor.export_hf_weights(), f"step-{step + 1}")
            if controller and dumps is not None:  # every rank read its dumps before the (collective) sync
                step_metrics |= _retire_dumps(cfg, dumps, step)
            step_metrics |= timer.metrics()
            metrics.log(step, step_metrics)
            history.append({"step": step, **step_metrics})
            if controller:
                logger.info("step %d: %s", step, _summary(step_metrics))
            if _maybe_save(cfg, ckpt_root, out_dir, step + 1, actor, prompts, stop):
                saved_at = step + 1
        sync.close()
    if stopped is None:
        stop.clear()  # a request that came during the last step: nothing is left to stop
    else:
        metrics.close()
        teardown_parallel()
        raise stopped
    digest = _weights_digest(actor)
    if controller:  # lets an operator (and the resume tests) compare two runs' final weights
        (out_dir / "final_weights.sha256").write_text(digest + "\n")
        logger.info("final weights sha256 %s", digest)
    metrics.close()
    teardown_parallel()
    return history


def _rollout_group(cfg: RunConfig, out_dir):
    """The engines + router this run talks to: started here (local executor), or, inside a Slurm
    het job (a trainer task of launchers/role.py), the ones het-group 0 started."""
    from miles.cluster.slurm_rollout import SlurmRollout, in_het_job

    return SlurmRollout(cfg, out_dir) if in_het_job() else LocalRollout(cfg, out_dir)


def _rollout_side(cfg: RunConfig, tokenizer, plugins: dict, rollout: LocalRollout):
    rc = cfg.rollout
    prompts = JsonlPromptSource(rc.data_path, tokenizer=tokenizer, prompt_key=rc.prompt_key, label_key=rc.label_key,
                                apply_chat_template=rc.apply_chat_template, shuffle=rc.shuffle, seed=cfg.run.seed)
    client = RolloutClient(rollout.router_url, rc, plugins["reward.fn"], tokenizer, [tokenizer.eos_token_id],
                           dynamic_filter=plugins.get("rollout.dynamic_filter"), seed=cfg.run.seed, progress=True)
    return prompts, client


def _resume(cfg: RunConfig, ckpt_root, actor) -> tuple[int, dict]:
    """(completed steps, RL state) of the newest valid checkpoint, or (0, {}) for a fresh start."""
    from miles.checkpoint.store import load_checkpoint

    loaded = load_checkpoint(ckpt_root, actor) if cfg.checkpoint.resume else None
    if loaded is None:
        return 0, {}
    step, rl_state = loaded
    logger.info("resumed from %s at step %d", ckpt_root, step)
    return step, rl_state


def _maybe_save(cfg: RunConfig, ckpt_root, out_dir, completed: int, actor, prompts, stop: StopRequest) -> bool:
    """Save when the interval is due, at the last step (if saving is on), or when the sentinel exists;
    return whether it saved. Collective: every rank decides the same way (save_requested agrees)."""
    from miles.checkpoint.sentinel import clear_sentinel, save_requested

    sentinel = cfg.checkpoint.sentinel_path(out_dir)
    forced = sentinel is not None and save_requested(sentinel)
    final = cfg.checkpoint.save_interval > 0 and completed == cfg.run.num_steps
    if not (forced or final or cfg.checkpoint.is_due(completed)):
        return False
    pause_for_test("save", completed - 1, out_dir, stop)
    _save(cfg, ckpt_root, completed, actor, prompts)
    if forced:
        clear_sentinel(sentinel)
    return True


def _save(cfg: RunConfig, ckpt_root, completed: int, actor, prompts) -> None:
    """Collective: checkpoint after `completed` RL steps (model, optimizer, RNG, data cursor, config)."""
    from miles.checkpoint.store import save_checkpoint
    from miles.config.loader import config_to_yaml

    rl_state = {"step": completed, "data": prompts.state_dict() if prompts is not None else None}
    save_checkpoint(ckpt_root, completed, actor, rl_state, config_to_yaml(cfg), keep_last=cfg.checkpoint.keep_last)


def _weights_digest(actor) -> str:
    """sha256 over the exported HF weights (name, dtype, shape, bytes), in export order."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in actor.export_hf_weights():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _routing_dumps(cfg: RunConfig):
    """R3's node-local dump store (r3.enabled), else None."""
    if not cfg.r3.enabled:
        return None
    from miles.routing.dump_store import RoutingDumpStore

    # The controller writes, every rank reads: all use the controller's folder (the default one
    # is per process). On one node that is node-local; see docs/r3.md for multi-node trainers.
    store = RoutingDumpStore(_broadcast(str(RoutingDumpStore(cfg.r3.dump_dir).root)))
    logger.info("R3: routing dumps under %s", store.root)
    return store


def _dump_writer(dumps, step: int, actor):
    """The step's dump writer (a context manager), or a null context without R3."""
    if dumps is None:
        return nullcontext()
    from miles.trainer.model_provider import hf_architecture

    arch = hf_architecture(actor.hf_config)  # dumps hold all layers (dense ones zero), as SGLang sends them
    return dumps.writer(step, num_layers=arch.num_layers, top_k=arch.top_k, num_experts=arch.num_experts)


def _read_routing(dumps, samples) -> list:
    """The engine's routing [T, L, K] of these samples (one trainer rank's micro-batch)."""
    missing = [s.sample_id for s in samples if not s.routed_experts_ref]
    if missing:
        raise RuntimeError(f"R3 is on but samples {missing[:5]} carry no routing dump reference")
    return dumps.read([s.routed_experts_ref for s in samples],
                      expected_tokens=[len(s.prompt_tokens) + len(s.response_tokens) - 1 for s in samples])


def _retire_dumps(cfg: RunConfig, dumps, step: int) -> dict[str, float]:
    """Dump size metrics of the trained step; then delete its file (unless r3.keep_dumps)."""
    path = dumps.path(step)
    metrics = {"r3/dump_bytes": float(path.stat().st_size), "r3/bytes_per_token": dumps.bytes_per_token(step)}
    if not cfg.r3.keep_dumps:
        dumps.delete_step(step)
    return metrics


def _collect_batch(cfg: RunConfig, client: RolloutClient, prompts: JsonlPromptSource,
                   routing_writer=None) -> tuple[list[Sample], dict]:
    """rollout_batch_size groups: over-sample while the dynamic filter drops groups (up to
    rollout.max_rounds rounds), then pad with dropped groups, whose advantages are zero.
    With R3, `routing_writer` (the step's dump writer) receives every sample's routing."""
    with routing_writer or nullcontext() as sink:
        return _collect_groups(cfg, client, prompts, sink)


def _collect_groups(cfg: RunConfig, client: RolloutClient, prompts: JsonlPromptSource,
                    sink) -> tuple[list[Sample], dict]:
    want = cfg.rollout.rollout_batch_size
    kept: list[list[Sample]] = []
    spare: list[list[Sample]] = []
    metrics: dict = {}
    for round_ in range(cfg.rollout.max_rounds):
        batch = client.generate_sync(prompts.next_prompts(want - len(kept)), sink)
        metrics = metrics or dict(batch.metrics)  # the first round is the unbiased on-policy picture
        kept += batch.groups
        spare += batch.dropped_groups
        if len(kept) >= want:
            break
    padded = max(want - len(kept), 0)
    groups = kept[:want] + spare[:padded]
    metrics |= {"rollout/rounds": float(round_ + 1), "rollout/padded_groups": float(padded)}
    return [s for g in groups for s in g], metrics


def _sft_warmup(cfg: RunConfig, actor, tokenizer, metrics) -> None:
    samples = load_sft_samples(cfg.sft, tokenizer)
    for i, batch in enumerate(sft_batches(samples, cfg.sft, cfg.run.seed)):
        result = actor.train_sft(batch, lr=cfg.sft.lr)
        metrics.log(i - cfg.sft.steps, {f"sft/{k.split('/')[-1]}": v for k, v in result.items()})
    logger.info("SFT warm-up: %d steps, last loss %.4f", cfg.sft.steps, result.get("train/loss", float("nan")))


def _train_on(cfg: RunConfig, actor, samples: list[Sample]) -> dict[str, float]:
    """One rollout batch through the actor: old (and reference) logprobs, the train-infer
    mismatch, advantages, then trainer.num_steps_per_rollout optimizer steps."""
    temperature = cfg.rollout.temperature
    old_logprobs = actor.compute_logprobs(samples, temperature)
    ref_logprobs = actor.compute_ref_logprobs(samples, temperature) if actor.needs_reference else None
    metrics = train_infer_mismatch([s.rollout_logprobs for s in samples], old_logprobs)
    advantages = _advantages(cfg, samples, old_logprobs, ref_logprobs)
    rollout_logprobs = [torch.tensor(s.rollout_logprobs) for s in samples]
    return metrics | actor.train_rl(samples, advantages, old_logprobs, rollout_logprobs,
                                    ref_logprobs=ref_logprobs, temperature=temperature)


def _advantages(cfg: RunConfig, samples: list[Sample], old_logprobs: list[torch.Tensor],
                ref_logprobs: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Per-token advantages of each sample (group normalisation within each prompt group; the
    REINFORCE++ estimators fold a reward-level KL to the reference in when algo.kl_coef != 0)."""
    lengths = [len(s.response_tokens) for s in samples]
    mask_BT = torch.zeros(len(samples), max(lengths), dtype=torch.float32)
    kl_BT = None if ref_logprobs is None else torch.zeros_like(mask_BT)
    for i, n in enumerate(lengths):
        mask_BT[i, :n] = torch.tensor(samples[i].loss_mask, dtype=torch.float32)
        if kl_BT is not None:
            kl_BT[i, :n] = kl_estimate(old_logprobs[i], ref_logprobs[i], cfg.algo.kl_estimator)
    rewards_B = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    group_ids_B = torch.tensor([s.group_id for s in samples])
    adv_BT = compute_advantages(cfg.algo, rewards_B, group_ids_B, mask_BT, kl_BT=kl_BT)
    return [adv_BT[i, :n] for i, n in enumerate(lengths)]


def _broadcast(obj):
    """Rank 0's object on every rank (identity in a single-process run)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _summary(m: dict) -> str:
    keys = ("rollout/reward_mean", "train/loss", "mismatch/max", "rollout/groups_kept", "time/step")
    return " ".join(f"{k.split('/')[-1]}={m[k]:.4g}" for k in keys if k in m)


def _default_single_process_env() -> None:
    """Started by hand (not by torchrun/srun): a world of one trainer rank on this machine."""
    if "RANK" in os.environ:
        return
    from miles.engines.ports import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True, help="recipe name in configs/ or a YAML path")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=0.7")
    args = ap.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [trainer rank={rank}] %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-bucket and per-param INFO lines
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _default_single_process_env()
    try:
        cfg = load_config(args.recipe, args.overrides)
        stop = StopRequest(run_dir(cfg))
        stop.install_signal_handlers()  # SIGUSR1/SIGTERM: save at the next step boundary, exit 75
        train(cfg, stop)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        logger.info("%s; exiting with %d (run the same command again to continue)", exc, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
