"""MegatronActor on one gloo rank (TP=1): log-probs vs transformers, micro-batching invariance,
RL sign sanity and exact loss normalisation, SFT, lr warmup, bf16, input checks.

The checkpoint is the tiny Qwen3 with weights redrawn at std 0.2 (as in test_hf_convert), so the
distribution is far from flat and layout or masking mistakes move log-probs by far more than the
tolerances.
"""


import pytest
import torch

from miles.algo.config import AlgoConfig
from miles.errors import ConfigError
from miles.rollout.sample import Sample
from miles.trainer.actor import MegatronActor
from miles.trainer.batching import plan_micro_batches
from miles.trainer.config import TrainerConfig

TEMPERATURE = 0.7
PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302], [42], [1, 2, 3, 4, 5, 6, 7], [77, 78], [8], [60, 61, 62]]
RESPONSES = [[11, 12, 13, 14], [3], [400, 401, 402, 403, 404, 405], [7, 8, 9], [20, 21], [30, 31, 32, 33, 34],
             [450, 451, 452, 453, 454, 455, 456, 457], [99]]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory, redrawn_checkpoint):
    out = tmp_path_factory.mktemp("actor") / "qwen3-tiny-std02"
    redrawn_checkpoint(tiny_model, out)
    return out


def make_samples(n: int = len(PROMPTS), masked_last: bool = False) -> list[Sample]:
    return [Sample(group_id=i // 2, index=i % 2, prompt_tokens=p, response_tokens=r,
                   loss_mask=[1] * (len(r) - 1) + [0] if masked_last and len(r) > 1 else [1] * len(r))
            for i, (p, r) in enumerate(zip(PROMPTS[:n], RESPONSES[:n]))]


def make_actor(megatron_tp1, checkpoint, algo: AlgoConfig | None = None, **trainer) -> MegatronActor:
    cfg = TrainerConfig(**{"lr": 1e-3, **trainer})
    return MegatronActor(str(checkpoint), cfg, algo or AlgoConfig(), megatron_tp1)


def weights(actor: MegatronActor) -> dict[str, torch.Tensor]:
    return {name: t.detach().float().clone() for name, t in actor.export_hf_weights()}


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_plan_micro_batches():
    lengths = [5, 9, 3, 20, 4, 4]
    assert plan_micro_batches(lengths, 4) == [[0, 1, 2, 3], [4, 5]]
    plan = plan_micro_batches(lengths, 1, max_tokens=12)
    assert sorted(i for mb in plan for i in mb) == list(range(6))
    assert [3] in plan  # longer than the budget: alone
    for mb in plan:
        assert len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= 12
    assert plan == [[3], [1], [0, 4], [5, 2]]  # longest first, greedy
    assert plan_micro_batches([], 2) == [] and plan_micro_batches([], 2, max_tokens=8) == []
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        plan_micro_batches([1], 0)


@pytest.mark.parametrize("batching", [{"micro_batch_size": 3}, {"max_tokens_per_microbatch": 20}])
def test_logprobs_and_entropy_match_transformers(megatron_tp1, checkpoint, batching):
    from transformers import AutoModelForCausalLM

    from miles.trainer.logprobs import build_padded_batch, split_responses

    actor = make_actor(megatron_tp1, checkpoint, **batching)
    samples = make_samples()
    got_lp, got_ent = actor.compute_logprobs(samples, TEMPERATURE, with_entropy=True)
    assert torch.equal(torch.cat(actor.compute_logprobs(samples, TEMPERATURE)), torch.cat(got_lp))

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for i, sample in enumerate(samples):  # one sequence at a time: no padding on the reference side
        batch = build_padded_batch([sample.prompt_tokens], [sample.response_tokens], pad_id=0)
        with torch.no_grad():
            logp_BSV = torch.log_softmax(hf(batch.input_ids_BS).logits / TEMPERATURE, dim=-1)
        ref_lp = split_responses(logp_BSV.gather(-1, batch.targets_BS[..., None])[..., 0], batch)[0]
        ref_ent = split_responses(-(logp_BSV.exp() * logp_BSV).sum(-1), batch)[0]
        assert got_lp[i].dtype == torch.float32 and got_lp[i].shape == (len(sample.response_tokens),)
        assert (got_lp[i] - ref_lp).abs().max().item() < 1e-5, i
        assert (got_ent[i] - ref_ent).abs().max().item() < 1e-5, i
    assert min(t.min().item() for t in got_lp) < -3.0  # a sharp distribution: the comparison is sensitive


@pytest.mark.parametrize("loss_reduction", ["sample_mean", "token_mean"])
def test_dynamic_and_fixed_micro_batching_give_the_same_step(megatron_tp1, checkpoint, loss_reduction):
    algo = AlgoConfig(loss_reduction=loss_reduction, entropy_coef=0.01)
    samples = make_samples(masked_last=True)
    gen = torch.Generator().manual_seed(1)
    advantages = [torch.randn(len(s.response_tokens), generator=gen) for s in samples]
    results = []
    for batching in ({"micro_batch_size": 1}, {"micro_batch_size": 4}, {"max_tokens_per_microbatch": 16}):
        # adam_eps 1e-4 instead of 1e-8: Adam's early steps are ~lr * g / (|g| + eps), which turns fp32
        # summation-order noise in the few ~0 gradients into weight differences of up to ~1e-5; with
        # this eps the update is smooth in g and the weights compare at 1e-6.
        actor = make_actor(megatron_tp1, checkpoint, algo, global_batch_size=4, num_steps_per_rollout=2,
                           adam_eps=1e-4, **batching)
        old = actor.compute_logprobs(samples, TEMPERATURE)
        metrics = actor.train_rl(samples, advantages, old, temperature=TEMPERATURE)
        results.append((metrics, weights(actor), actor.compute_logprobs(samples, TEMPERATURE)))

    (ref_metrics, ref_weights, ref_after), *others = results
    assert ref_metrics["train/num_microbatches"] == 4
    assert [m["train/num_microbatches"] for m, _, _ in others] == [1, 3]  # budget 16 splits each step in 3
    assert abs(ref_metrics["train/ppo_kl"]) > 1e-4  # the second step trained off-policy, so ratios moved
    for metrics, new_weights, after in others:
        for key in ("train/loss", "train/pg_loss", "train/entropy", "train/ppo_kl", "train/pg_clipfrac",
                    "train/num_tokens"):
            # (averaged over both steps; the second one runs at weights that already differ by fp32 noise)
            assert abs(metrics[key] - ref_metrics[key]) < 2e-6 * max(1.0, abs(ref_metrics[key])), key
        assert abs(metrics["train/grad_norm"] - ref_metrics["train/grad_norm"]) < 1e-5 * ref_metrics["train/grad_norm"]
        weight_diff = max((new_weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        print(f"{loss_reduction}: max |dW| {weight_diff:.2e}, max |dlogp| {max_diff(after, ref_after):.2e}, "
              f"loss diff {abs(metrics['train/loss'] - ref_metrics['train/loss']):.2e}, step "
              f"{metrics['train/step_seconds'] * 1e3:.1f} ms ({metrics['train/num_microbatches']:.0f} micro-batches)")
        assert weight_diff < 1e-6
        assert max_diff(after, ref_after) < 1e-5


def test_rl_step_follows_the_advantage_sign_with_exact_loss(megatron_tp1, checkpoint):
    actor = make_actor(megatron_tp1, checkpoint, global_batch_size=2, num_steps_per_rollout=1)
    samples = make_samples(2)
    before_w = weights(actor)
    old = actor.compute_logprobs(samples, TEMPERATURE)
    advantages = [torch.full_like(old[0], 1.0), torch.full_like(old[1], -0.5)]
    rollout = [lp + 0.1 for lp in old]
    metrics = actor.train_rl(samples, advantages, old, rollout, temperature=TEMPERATURE)

    assert abs(metrics["train/pg_loss"] - (-(1.0 - 0.5) / 2)) < 1e-6  # ratio 1: -mean over samples of A
    assert metrics["train/ppo_kl"] == 0 and metrics["train/pg_clipfrac"] == 0
    assert abs(metrics["train/train_rollout_logprob_abs_diff"] - 0.1) < 1e-6
    assert metrics["train/lr"] == 1e-3 and metrics["train/grad_norm"] > 0
    assert metrics["train/num_tokens"] == 5 and metrics["train/num_samples"] == 2
    assert actor.num_optimizer_steps == 1
    after = actor.compute_logprobs(samples, TEMPERATURE)
    assert after[0].sum() > old[0].sum() + 0.01  # positive advantage: more likely
    assert after[1].sum() < old[1].sum() - 0.01  # negative advantage: less likely
    assert max((weights(actor)[k] - before_w[k]).abs().max().item() for k in before_w) > 5e-4


def test_sft_loss_is_masked_mean_nll_decreases_and_warms_up(megatron_tp1, checkpoint):
    actor = make_actor(megatron_tp1, checkpoint, lr_warmup_steps=2, micro_batch_size=2)
    samples = make_samples(4, masked_last=True)
    logprobs = actor.compute_logprobs(samples, temperature=1.0)
    expected = -sum((lp * torch.tensor(s.loss_mask)).sum() for lp, s in zip(logprobs, samples)).item() / 11
    history = [actor.train_sft(samples) for _ in range(6)]
    assert history[0]["train/num_tokens"] == 11  # 14 response tokens, 3 masked out
    assert abs(history[0]["train/loss"] - expected) < 1e-5
    assert [h["train/lr"] for h in history[:3]] == pytest.approx([5e-4, 1e-3, 1e-3], rel=1e-12)
    losses = [h["train/loss"] for h in history]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses
    assert actor.num_optimizer_steps == 6

    fixed = actor.train_sft(samples, lr=2e-4, num_steps=2)  # off-schedule warm-up steps, 2 samples each
    assert fixed["train/lr"] == 2e-4 and fixed["train/num_samples"] == 2 and fixed["train/num_microbatches"] == 1
    assert fixed["train/loss"] < losses[-1]
    assert actor.num_optimizer_steps == 6 and actor.optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="cannot split 4 samples into 3 equal steps"):
        actor.train_sft(samples, num_steps=3)


def test_bf16_actor_trains_and_exports_bf16(megatron_tp1, checkpoint):
    samples = make_samples(4)
    fp32 = make_actor(megatron_tp1, checkpoint).compute_logprobs(samples, TEMPERATURE)
    actor = make_actor(megatron_tp1, checkpoint, bf16=True, global_batch_size=4, micro_batch_size=2)
    assert "type" not in torch.Tensor.__dict__  # the S9 shim was scoped to building the optimizer
    before = weights(actor)
    old = actor.compute_logprobs(samples, TEMPERATURE)
    assert max_diff(old, fp32) < 0.25  # bf16 weights and activations
    metrics = actor.train_rl(samples, [torch.ones_like(lp) for lp in old], old, temperature=TEMPERATURE)
    assert metrics["train/skipped_steps"] == 0 and metrics["train/grad_norm"] > 0
    exported = dict(actor.export_hf_weights())
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert max((exported[k].float() - before[k]).abs().max().item() for k in before) > 5e-4


def test_rejects_inconsistent_inputs(megatron_tp1, checkpoint):
    actor = make_actor(megatron_tp1, checkpoint, global_batch_size=2, num_steps_per_rollout=2)
    samples = make_samples(4)
    ones = [torch.ones(len(s.response_tokens)) for s in samples]
    with pytest.raises(ValueError, match=r"got 3 samples; expected global_batch_size \(2\) x steps \(2\) = 4"):
        actor.train_rl(samples[:3], ones[:3], ones[:3])
    with pytest.raises(ValueError, match=r"advantages of sample 0-1 has shape \(2,\), expected \(1,\)"):
        actor.train_rl(samples, [ones[0], torch.ones(2), *ones[2:]], ones)
    with pytest.raises(ValueError, match="old_logprobs: 3 tensors for 4 samples"):
        actor.train_rl(samples, ones, ones[:3])
    bad = make_samples(1)
    bad[0].loss_mask = [1]
    with pytest.raises(ValueError, match="sample 0-0: loss_mask has 1 entries for 4 response tokens"):
        actor.train_sft(bad)
    assert actor.num_optimizer_steps == 0
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=2 but init_parallel was called with tp_size=1"):
        MegatronActor(str(checkpoint), TrainerConfig(tensor_model_parallel_size=2), AlgoConfig(), megatron_tp1)
