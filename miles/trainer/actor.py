"""`MegatronActor`: the policy on a trainer rank: log-probs, RL and SFT train steps, HF export.

Legend: B samples in a micro-batch, S padded sequence length, Vp this TP rank's vocabulary
slice, T longest response in a micro-batch, R one sample's response length.

Data contract: every rank is handed the whole batch (the same samples in the same order on
all ranks). An optimizer step takes the next `trainer.global_batch_size` samples; data-parallel
rank r trains on the r-th contiguous slice of them, split into micro-batches (fixed
`micro_batch_size`, or dynamic batching under `max_tokens_per_microbatch`). Loss normalisers
(sample and trained-token counts) are those of the whole step batch, so the micro-batch losses
add up to the global loss whatever the split. Megatron's schedule divides each micro-batch loss
by the number of micro-batches and DDP averages gradients over DP ranks; the loss handed to
it is multiplied by both to cancel that.

The step follows Megatron-LM's `train_step`: zero the grad buffers, `get_forward_backward_func()`
(no pipelining) over the micro-batches, `finalize_model_grads` (DP all-reduce, and the TP
all-reduce of q/k-layernorm grads), then the lr scheduler and `optimizer.step()` (AdamW, clip by
global norm). The scheduler advances *before* the optimizer step, so with `lr_warmup_steps=W`
step k (1-based) uses lr * min(k, W) / W and no step runs at lr 0.

R3 (rollout routing replay, MoE): with `routing_source` set (a callable returning the engine's
routing dumps [T, L, K] of the samples it is given), every RL forward of the actor and of the
reference replays the engine's experts (miles/routing/replay.py): each rank loads the dumps of its
own micro-batches only. Activation recomputation (trainer.recompute_granularity=full) replays them
again. SFT steps route freely: their samples were never rolled out.

Expert parallelism: trainer.expert_model_parallel_size splits the experts over EP ranks (carved out of
the data-parallel ranks, as in megatron); `export_hf_weights` all-gathers the experts over the EP
group, so every rank yields every expert.

Log-prob head (trainer.logprob_impl): "full" takes log-probs and entropy from the [B, S, Vp]
logits; "chunked" from the final hidden states and the output layer's weight through
miles.kernels.logprob_entropy, so no logits of a micro-batch ever exist (miles/trainer/logprobs.py,
`model_forward`, says how and why that is safe under DDP, Float16Module, recomputation and TP).

Reference policy: when the algorithm needs pi_ref (`needs_reference`: algo.use_kl_loss, or the
REINFORCE++ reward-level KL algo.kl_coef != 0) a second GPTModel is built from the same HF
weights with the same TP layout, frozen (eval mode, no grads, no DDP, no optimizer), and
`compute_ref_logprobs` runs it like `compute_logprobs` runs the actor.
"""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from miles.algo.actor_loss import ActorLossInput, actor_loss
from miles.algo.config import AlgoConfig
from miles.algo.corrections import ImportanceCorrection
from miles.algo.reduction import reduce_token_mean
from miles.errors import ConfigError
from miles.rollout.sample import Sample
from miles.routing.replay import RoutingReplay, replay_targets
from miles.trainer.batching import MicroBatch, build_micro_batches, dp_slice
from miles.trainer.config import TrainerConfig
from miles.trainer.logprobs import ForwardOutput, check_hidden_states_head, model_forward, split_responses
from miles.trainer.model_provider import hf_architecture, is_moe
from miles.trainer.parallel import ParallelState

logger = logging.getLogger(__name__)

# loss_fn(micro_batch, forward output) -> (loss for backward, metrics or outputs of this micro-batch)
LossFn = Callable[[MicroBatch, ForwardOutput], tuple[torch.Tensor, Any]]
# routing_source(samples) -> the engine's routing dump [T, L, K] of each sample (R3)
RoutingSource = Callable[[Sequence[Sample]], Sequence[Any]]


@dataclass(frozen=True, eq=False)
class _StepData:
    """Per-sample loss inputs of one optimizer step (whole lists, indexed by MicroBatch.indices)."""

    masks: list[torch.Tensor]
    """Loss mask [R] of every sample."""
    advantages: list[torch.Tensor] | None
    """Advantages [R] (RL only)."""
    old_logprobs: list[torch.Tensor] | None
    """log pi_old [R] (RL only)."""
    rollout_logprobs: list[torch.Tensor] | None
    """Engine log-probs [R], or None."""
    ref_logprobs: list[torch.Tensor] | None
    """Reference-model log-probs [R], or None."""
    num_samples: int
    """Samples in the step's global batch (all DP ranks)."""
    num_tokens: int
    """Trained tokens (loss-mask ones) in the step's global batch (all DP ranks)."""


def _loss_mask(sample: Sample) -> torch.Tensor:
    if not sample.loss_mask:
        return torch.ones(len(sample.response_tokens), dtype=torch.float32)
    if len(sample.loss_mask) != len(sample.response_tokens):
        raise ValueError(f"sample {sample.sample_id}: loss_mask has {len(sample.loss_mask)} entries for "
                         f"{len(sample.response_tokens)} response tokens")
    return torch.tensor(sample.loss_mask, dtype=torch.float32)


def _check_per_token(name: str, values: Sequence[torch.Tensor] | None, samples: Sequence[Sample]) -> None:
    if values is None:
        return
    if len(values) != len(samples):
        raise ValueError(f"{name}: {len(values)} tensors for {len(samples)} samples")
    for value, sample in zip(values, samples):
        if tuple(value.shape) != (len(sample.response_tokens),):
            raise ValueError(f"{name} of sample {sample.sample_id} has shape {tuple(value.shape)}, expected "
                             f"({len(sample.response_tokens)},) (one value per response token)")


class MegatronActor:
    """The trainable policy on this rank: megatron GPTModel + DDP + optimizer + lr scheduler.

    Needs `init_parallel` done (and `cpu_compat.apply_cpu_compat()` on CPU). Every method is
    collective over the trainer ranks: call it on all of them with the same arguments.
    """

    def __init__(self, hf_path: str, trainer_cfg: TrainerConfig, algo_cfg: AlgoConfig, parallel: ParallelState,
                 correction: ImportanceCorrection | None = None, routing_source: RoutingSource | None = None) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config
        from transformers import AutoConfig

        from miles.trainer.hf_convert import load_hf_state_dict

        if trainer_cfg.tensor_model_parallel_size != parallel.tp_size:
            raise ConfigError(f"trainer.tensor_model_parallel_size={trainer_cfg.tensor_model_parallel_size} but "
                              f"init_parallel was called with tp_size={parallel.tp_size}")
        if trainer_cfg.expert_model_parallel_size != parallel.ep_size:
            raise ConfigError(f"trainer.expert_model_parallel_size={trainer_cfg.expert_model_parallel_size} but "
                              f"init_parallel was called with ep_size={parallel.ep_size}")
        if parallel.pp_size != 1:
            raise ConfigError(f"MegatronActor does not support pipeline parallelism yet (pp_size={parallel.pp_size})")
        self.cfg, self.algo_cfg, self.parallel, self.correction = trainer_cfg, algo_cfg, parallel, correction
        self.hf_config = AutoConfig.from_pretrained(hf_path)
        self.routing_source = routing_source
        if routing_source is not None and not is_moe(self.hf_config):
            raise ConfigError(f"R3 (routing replay) needs an MoE model; {hf_path} is "
                              f"{self.hf_config.model_type!r}")
        self.pad_id = self.hf_config.pad_token_id if self.hf_config.pad_token_id is not None else 0
        dtype = torch.bfloat16 if trainer_cfg.bf16 else torch.float32
        hf_state = load_hf_state_dict(hf_path)
        # init_weights=True although the HF weights overwrite everything: megatron-core 0.16.1 sets the
        # tensor_model_parallel attributes (which the TP grad norm relies on) only inside its init
        # branches (tensor_parallel/layers.py:855/877), so perform_initialization=False breaks TP>1.
        module = self._build_module(hf_state, dtype, init_weights=True)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False)
        self.model = DistributedDataParallel(config=get_model_config(module), ddp_config=ddp_config, module=module)
        self.model.broadcast_params()
        self.optimizer = self._build_optimizer(dtype)
        self.scheduler = self._build_scheduler()
        model_config = get_model_config(self.model)
        model_config.grad_scale_func = self.optimizer.scale_loss
        model_config.finalize_model_grads_func = finalize_model_grads
        model_config.no_sync_func = self.model.no_sync
        self._forward_backward = get_forward_backward_func()
        self._replays: dict[int, RoutingReplay] = {}
        self.ref_model: torch.nn.Module | None = None
        if self.needs_reference:
            # The frozen pi_ref: no grads, so no TP attributes needed and no random init to pay for.
            self.ref_model = self._build_module(hf_state, dtype, init_weights=False)
            self.ref_model.requires_grad_(False)
            self.ref_model.eval()
            logger.info("built the frozen reference model (algo.use_kl_loss=%s, algo.kl_coef=%s)",
                        algo_cfg.use_kl_loss, algo_cfg.kl_coef)

    def _build_module(self, hf_state: dict[str, torch.Tensor], dtype: torch.dtype, init_weights: bool):
        """A GPTModel (Float16Module-wrapped in bf16) holding this rank's TP shards of `hf_state`."""
        from megatron.core.transformer.module import Float16Module

        from miles.trainer.hf_convert import load_hf_weights
        from miles.trainer.model_provider import build_gpt_model

        recompute = (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
                     if self.cfg.recompute_granularity == "full" else {})
        module = build_gpt_model(self.hf_config, tp_size=self.parallel.tp_size, params_dtype=dtype,
                                 init_weights=init_weights, **recompute)
        if dtype == torch.bfloat16:
            module = Float16Module(module.config, module)
        load_hf_weights(module, hf_state, self.hf_config)
        if self.cfg.logprob_impl == "chunked":
            check_hidden_states_head(module)
        return module

    def _build_optimizer(self, dtype: torch.dtype):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from miles.trainer import cpu_compat

        cfg = self.cfg
        opt_config = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=0.0, weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            bf16=cfg.bf16, params_dtype=dtype, use_distributed_optimizer=False,
        )
        # The bf16 optimizer checks CUDA type strings (shim S9 on CPU).
        needs_s9 = cfg.bf16 and not torch.cuda.is_available()
        with cpu_compat.cuda_type_strings() if needs_s9 else contextlib.nullcontext():
            return get_megatron_optimizer(opt_config, [self.model])

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=0.0, lr_warmup_steps=cfg.lr_warmup_steps,
            lr_decay_steps=cfg.lr_warmup_steps + 1, lr_decay_style="constant",
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
        )

    @property
    def needs_reference(self) -> bool:
        """Whether the algorithm uses pi_ref (a KL loss, or the REINFORCE++ reward-level KL)."""
        return self.algo_cfg.use_kl_loss or self.algo_cfg.kl_coef != 0

    @property
    def num_optimizer_steps(self) -> int:
        """Scheduled optimizer steps taken so far (SFT steps at a fixed lr are not counted)."""
        return self.scheduler.num_steps

    # ------------------------------------------------------------------ batching

    def _micro_batches(self, samples: Sequence[Sample], indices: Sequence[int],
                       replay: bool = True) -> list[MicroBatch]:
        """Padded micro-batches; with R3 (and `replay`) each carries its samples' replay targets."""
        micro_batches = build_micro_batches(samples, indices, micro_batch_size=self.cfg.micro_batch_size,
                                            max_tokens=self.cfg.max_tokens_per_microbatch, pad_id=self.pad_id,
                                            device=self.parallel.device)
        if self.routing_source is None or not replay:
            return micro_batches
        return [self._with_routing(mb, [samples[i] for i in mb.indices]) for mb in micro_batches]

    def _with_routing(self, mb: MicroBatch, chosen: list[Sample]) -> MicroBatch:
        """`mb` with its R3 replay targets: the engine's routing of exactly these samples."""
        arch = hf_architecture(self.hf_config)
        targets = replay_targets(mb.batch, self.routing_source(chosen), num_layers=arch.num_layers,
                                 top_k=arch.top_k, num_experts=arch.num_experts, moe_layers=arch.moe_layers,
                                 sample_ids=[s.sample_id for s in chosen])
        return MicroBatch(indices=mb.indices, batch=mb.batch,
                          routing=[t.to(self.parallel.device) for t in targets])

    def _replay_of(self, model: torch.nn.Module) -> "RoutingReplay":
        if id(model) not in self._replays:
            self._replays[id(model)] = RoutingReplay(model)
        return self._replays[id(model)]

    def _dp_slice(self, start: int, stop: int) -> list[int]:
        return dp_slice(start, stop, self.parallel.dp_size, self.parallel.dp_rank)

    def _run(self, micro_batches: list[MicroBatch], loss_fn: LossFn, forward_only: bool,
             model: torch.nn.Module | None = None) -> list[Any]:
        """megatron's forward(-backward) schedule over the micro-batches of `model` (default: the actor);
        per-micro-batch loss_fn outputs."""

        model = self.model if model is None else model
        replayed = [mb.routing is not None for mb in micro_batches]
        assert all(replayed) or not any(replayed), "a schedule mixes replayed and free-routing micro-batches"
        replay = self._replay_of(model) if all(replayed) else None

        def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
            mb = next(data_iterator)
            if replay is not None:
                replay.replay_forward(mb.routing)
            return model_forward(model, mb.batch, self.cfg.logprob_impl), partial(_after_forward, replay, loss_fn, mb)

        try:
            return self._forward_backward(
                forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model,
                num_microbatches=len(micro_batches),
                seq_length=max(mb.batch.input_ids_BS.shape[1] for mb in micro_batches),
                micro_batch_size=max(len(mb.indices) for mb in micro_batches), forward_only=forward_only,
            )
        finally:
            if replay is not None:
                replay.clear()

    # ------------------------------------------------------------------ log-probs

    def compute_logprobs(
        self, samples: Sequence[Sample], temperature: float = 1.0, with_entropy: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-sample response log-probs log_softmax(logits / T)[token] (fp32 [R], on the CPU).

        Forward only; DP ranks share the work and all-gather, so every rank returns all samples.
        With `with_entropy=True` returns (logprobs, entropies).
        """
        self.model.eval()
        try:
            results = self._forward_logprobs(self.model, samples, temperature, with_entropy)
        finally:
            self.model.train()
        logprobs = [results[i][0] for i in range(len(samples))]
        if with_entropy:
            return logprobs, [results[i][1] for i in range(len(samples))]
        return logprobs

    def compute_ref_logprobs(self, samples: Sequence[Sample], temperature: float = 1.0) -> list[torch.Tensor]:
        """log pi_ref of each sample's response tokens (fp32 [R], on the CPU), as compute_logprobs does
        for the actor: same micro-batching and DP all-gather, forward only, on the frozen initial weights.

        Raises RuntimeError when no reference was built (see `needs_reference`).
        """
        if self.ref_model is None:
            raise RuntimeError("no reference model: it is built only when algo.use_kl_loss is true or "
                               "algo.kl_coef != 0")
        results = self._forward_logprobs(self.ref_model, samples, temperature, with_entropy=False)
        return [results[i][0] for i in range(len(samples))]

    def _forward_logprobs(self, model: torch.nn.Module, samples: Sequence[Sample], temperature: float,
                          with_entropy: bool) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """{sample index: (logprobs, entropy or None)} of all samples: this DP rank's share, all-gathered."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        mine = self._dp_slice(0, len(samples))
        results: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if mine:
            with torch.no_grad():
                outputs = self._run(self._micro_batches(samples, mine),
                                    partial(_logprob_outputs, temperature=temperature, with_entropy=with_entropy),
                                    forward_only=True, model=model)
            for out in outputs:
                results.update(out)
        if self.parallel.dp_size > 1:
            from megatron.core import parallel_state as mpu

            gathered: list[dict] = [{} for _ in range(self.parallel.dp_size)]
            dist.all_gather_object(gathered, results, group=mpu.get_data_parallel_group())
            results = {k: v for part in gathered for k, v in part.items()}
        return results

    # ------------------------------------------------------------------ training

    def _step_ranges(self, num_samples: int, num_steps: int | None, batch_size: int | None) -> list[tuple[int, int]]:
        """[start, stop) of each optimizer step's global batch (sizes default to "all in one step")."""
        steps = num_steps or 1
        gbs = batch_size or num_samples // steps
        if gbs < 1 or gbs * steps != num_samples:
            raise ValueError(f"got {num_samples} samples; expected global_batch_size ({batch_size}) x "
                             f"steps ({steps}) = {gbs * steps}")
        if gbs % self.parallel.dp_size:
            raise ConfigError(f"trainer.global_batch_size={gbs} is not divisible by the data-parallel size "
                              f"{self.parallel.dp_size}")
        return [(s * gbs, (s + 1) * gbs) for s in range(steps)]

    def train_rl(self, samples: Sequence[Sample], advantages: Sequence[torch.Tensor],
                 old_logprobs: Sequence[torch.Tensor], rollout_logprobs: Sequence[torch.Tensor] | None = None,
                 ref_logprobs: Sequence[torch.Tensor] | None = None, temperature: float = 1.0) -> dict[str, float]:
        """`trainer.num_steps_per_rollout` optimizer steps of the actor loss (miles.algo.actor_loss).

        All per-token inputs are lists aligned with `samples`, one [R] tensor per sample. Returns
        "train/<metric>" averaged over the steps: the loss metrics of actor_loss (loss, pg_loss,
        pg_clipfrac, ppo_kl, entropy, kl_loss, tis, ...), grad_norm, lr, num_tokens, num_samples,
        num_microbatches (this rank's), skipped_steps and step_seconds.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for name, values in (("advantages", advantages), ("old_logprobs", old_logprobs),
                             ("rollout_logprobs", rollout_logprobs), ("ref_logprobs", ref_logprobs)):
            _check_per_token(name, values, samples)
        masks = [_loss_mask(s) for s in samples]
        per_step = []
        for start, stop in self._step_ranges(len(samples), self.cfg.num_steps_per_rollout, self.cfg.global_batch_size):
            data = _StepData(masks=masks, advantages=list(advantages), old_logprobs=list(old_logprobs),
                             rollout_logprobs=None if rollout_logprobs is None else list(rollout_logprobs),
                             ref_logprobs=None if ref_logprobs is None else list(ref_logprobs),
                             num_samples=stop - start, num_tokens=int(sum(masks[i].sum() for i in range(start, stop))))
            loss_fn = partial(self._rl_loss, data=data, temperature=temperature)
            per_step.append(self._train_step(samples, start, stop, loss_fn, data))
        return _mean_over_steps(per_step)

    def train_sft(self, samples: Sequence[Sample], lr: float | None = None, num_steps: int = 1) -> dict[str, float]:
        """`num_steps` supervised optimizer steps on equal slices of `samples` (temperature 1).

        Loss = mean NLL over the trained (loss-mask) response tokens of each step's batch. With
        `lr` set, these steps use that constant lr and do not advance the lr schedule (an SFT
        warm-up before RL); otherwise they are scheduled steps like RL ones. Returns "train/loss",
        grad_norm, lr, num_tokens, num_samples, ... averaged over the steps.
        """
        if lr is not None and lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if num_steps < 1 or len(samples) % num_steps:
            raise ValueError(f"cannot split {len(samples)} samples into {num_steps} equal steps")
        masks = [_loss_mask(s) for s in samples]
        per_step = []
        for start, stop in self._step_ranges(len(samples), num_steps, len(samples) // num_steps):
            data = _StepData(masks=masks, advantages=None, old_logprobs=None, rollout_logprobs=None,
                             ref_logprobs=None, num_samples=stop - start,
                             num_tokens=int(sum(masks[i].sum() for i in range(start, stop))))
            per_step.append(self._train_step(samples, start, stop, partial(self._sft_loss, data=data), data, lr,
                                             replay=False))
        return _mean_over_steps(per_step)

    def _train_step(self, samples: Sequence[Sample], start: int, stop: int, loss_fn: LossFn,
                    data: _StepData, lr: float | None = None, replay: bool = True) -> dict[str, float]:
        """zero grads, forward/backward over this DP rank's micro-batches, optimizer step; global metrics.
        `replay=False`: route freely even under R3 (SFT samples were never rolled out)."""
        from megatron.core import parallel_state as mpu

        began = time.perf_counter()
        micro_batches = self._micro_batches(samples, self._dp_slice(start, stop), replay)
        scale = len(micro_batches) * self.parallel.dp_size  # cancels the schedule's and DDP's averaging
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(micro_batches, lambda mb, out: _scaled(loss_fn(mb, out), scale), forward_only=False)
        keys = sorted(outputs[0])
        totals = torch.stack([sum(out[k].float() for out in outputs) for k in keys]).cpu()
        if self.parallel.dp_size > 1:
            dist.all_reduce(totals, group=mpu.get_data_parallel_group(with_context_parallel=True))
        metrics = {("entropy" if k == "entropy_loss" else k): v.item() for k, v in zip(keys, totals)}
        if math.isfinite(metrics["loss"]):
            metrics.update(self._optimizer_step(lr))
        else:  # same decision on every rank: the loss is all-reduced
            logger.warning("non-finite loss %s: skipping the optimizer step", metrics["loss"])
            metrics.update(skipped_steps=1.0, lr=self.optimizer.param_groups[0]["lr"])
        metrics.update(num_tokens=float(data.num_tokens), num_samples=float(data.num_samples),
                       num_microbatches=float(len(micro_batches)), step_seconds=time.perf_counter() - began)
        return metrics

    def _optimizer_step(self, lr: float | None) -> dict[str, float]:
        """Scheduled step (scheduler first, see the module docstring), or one at a fixed `lr` off-schedule."""
        if lr is None:
            self.scheduler.step(increment=1)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        used_lr = self.optimizer.param_groups[0]["lr"]
        updated, grad_norm, _ = self.optimizer.step()
        if lr is not None:
            self.scheduler.step(increment=0)  # back to the scheduled lr
        elif not updated:
            self.scheduler.step(increment=-1)
        if not updated:
            logger.warning("optimizer step skipped (inf/nan gradients)")
        out = {"lr": used_lr, "skipped_steps": float(not updated)}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def _rl_loss(self, mb: MicroBatch, out: ForwardOutput, *, data: _StepData,
                 temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, device = mb.batch, out.device
        # without an entropy bonus the entropy is logged only: no graph
        logprob_BS, entropy_BS = out.logprobs_and_entropy(batch.targets_BS, temperature,
                                                          "grad" if self.algo_cfg.entropy_coef != 0 else "detached")
        logprobs = split_responses(logprob_BS, batch)

        def rows(values: list[torch.Tensor] | None) -> torch.Tensor | None:
            return None if values is None else _pad_BT([values[i] for i in mb.indices], device)

        inp = ActorLossInput(
            logprobs_BT=_pad_BT(logprobs, device), old_logprobs_BT=rows(data.old_logprobs),
            advantages_BT=rows(data.advantages), mask_BT=rows(data.masks),
            rollout_logprobs_BT=rows(data.rollout_logprobs), ref_logprobs_BT=rows(data.ref_logprobs),
            entropy_BT=_pad_BT(split_responses(entropy_BS, batch), device),
            num_samples=data.num_samples, num_tokens=data.num_tokens,
        )
        return actor_loss(self.algo_cfg, inp, self.correction)

    def _sft_loss(self, mb: MicroBatch, out: ForwardOutput, *,
                  data: _StepData) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs = split_responses(out.logprobs_and_entropy(mb.batch.targets_BS)[0], mb.batch)
        nll_BT = -_pad_BT(logprobs, out.device)
        mask_BT = _pad_BT([data.masks[i] for i in mb.indices], out.device)
        loss = reduce_token_mean(nll_BT, mask_BT, num_tokens=data.num_tokens)
        return loss, {"loss": loss.detach()}

    # ------------------------------------------------------------------ export

    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for every weight, TP shards all-gathered; collective over TP ranks.

        Every TP rank must consume the whole iterator in order. Tensors are in the training dtype;
        replicated ones (norms) are views of the live parameters: copy before modifying.
        """
        from miles.trainer.hf_convert import ep_all_gather_experts, megatron_to_hf, named_weights, tp_all_gather

        gather = tp_all_gather() if self.parallel.tp_size > 1 else None
        params = named_weights(self.model)  # parameters + routers' expert-bias buffers
        if self.parallel.ep_size > 1:
            return ep_all_gather_experts(params, self.hf_config, self.parallel.ep_size)
        return megatron_to_hf(params, self.hf_config, self.parallel.tp_size, gather)


def _pad_BT(values: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Right-pad [R] tensors into [B, T] (zeros) on `device`."""
    return torch.nn.utils.rnn.pad_sequence([v.to(device) for v in values], batch_first=True, padding_value=0.0)


def _after_forward(replay: "RoutingReplay | None", loss_fn: LossFn, mb: MicroBatch, out: ForwardOutput):
    """The micro-batch's loss; first, with R3, let a recomputation in its backward replay the same experts."""
    if replay is not None:
        replay.replay_backward()
    return loss_fn(mb, out)


def _scaled(result: tuple[torch.Tensor, Any], scale: float) -> tuple[torch.Tensor, Any]:
    loss, metrics = result
    return loss * scale, metrics


def _logprob_outputs(mb: MicroBatch, out: ForwardOutput, *, temperature: float,
                     with_entropy: bool) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor | None]]]:
    """Forward-only 'loss': a dummy zero, and {sample index: (logprobs [R], entropy [R] or None)} on the CPU."""
    logprob_BS, entropy_BS = out.logprobs_and_entropy(mb.batch.targets_BS, temperature,
                                                      "detached" if with_entropy else "none")
    logprobs = split_responses(logprob_BS, mb.batch)
    entropy = split_responses(entropy_BS, mb.batch) if with_entropy else [None] * len(logprobs)
    results = {i: (lp.float().cpu(), None if ent is None else ent.float().cpu())
               for i, lp, ent in zip(mb.indices, logprobs, entropy)}
    return torch.zeros((), device=out.device), results


def _mean_over_steps(per_step: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for step in per_step for k in step})
    return {f"train/{k}": sum(step[k] for step in per_step if k in step) / sum(k in step for step in per_step)
            for k in keys}
