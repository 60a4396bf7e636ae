"""MegatronActor's frozen reference policy on one gloo rank (TP=1): built only when a KL setting
needs it, equal to the actor before any update, unchanged by RL/SFT steps, and feeding the KL loss.

Same sharp checkpoint as test_actor (tiny Qwen3 redrawn at std 0.2), so a moved or shared weight
shows up far above the tolerances.
"""


import pytest
import torch

from miles.algo.config import AlgoConfig
from miles.algo.kl import kl_estimate
from miles.rollout.sample import Sample
from miles.trainer.actor import MegatronActor
from miles.trainer.config import TrainerConfig

TEMPERATURE = 0.7
PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302], [42], [1, 2, 3, 4, 5, 6, 7], [77, 78]]
RESPONSES = [[11, 12, 13, 14], [3, 4], [400, 401, 402, 403, 404, 405], [7, 8, 9], [20, 21], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory, redrawn_checkpoint):
    out = tmp_path_factory.mktemp("actor_ref") / "qwen3-tiny-std02"
    redrawn_checkpoint(tiny_model, out)
    return out


def make_samples() -> list[Sample]:
    return [Sample(group_id=i // 2, index=i % 2, prompt_tokens=p, response_tokens=r, loss_mask=[1] * len(r))
            for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]


def make_actor(megatron_tp1, checkpoint, algo: AlgoConfig, **trainer) -> MegatronActor:
    cfg = TrainerConfig(**{"lr": 1e-3, "micro_batch_size": 2, **trainer})
    return MegatronActor(str(checkpoint), cfg, algo, megatron_tp1)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_reference_equals_actor_at_start_then_stays_frozen(megatron_tp1, checkpoint):
    algo = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.5, kl_estimator="k3")
    actor = make_actor(megatron_tp1, checkpoint, algo, global_batch_size=6, num_steps_per_rollout=1)
    samples = make_samples()
    assert actor.needs_reference
    ref_params = list(actor.ref_model.parameters())
    assert ref_params and not any(p.requires_grad for p in ref_params) and not actor.ref_model.training
    actor_ptrs = {p.data_ptr() for p in actor.model.parameters()}
    assert not actor_ptrs & {p.data_ptr() for p in ref_params}  # separate storage, not an alias

    ref0 = actor.compute_ref_logprobs(samples, TEMPERATURE)
    old = actor.compute_logprobs(samples, TEMPERATURE)
    assert all(r.dtype == torch.float32 and r.shape == (len(s.response_tokens),) for r, s in zip(ref0, samples))
    assert all(torch.equal(r, o) for r, o in zip(ref0, old))
    assert kl_estimate(torch.cat(old), torch.cat(ref0), "k3").abs().max().item() == 0.0
    assert min(t.min().item() for t in ref0) < -3.0  # a sharp distribution: equality is meaningful

    gen = torch.Generator().manual_seed(1)
    advantages = [torch.randn(len(s.response_tokens), generator=gen) for s in samples]
    first = actor.train_rl(samples, advantages, old, ref_logprobs=ref0, temperature=TEMPERATURE)
    assert abs(first["train/kl_loss"]) < 1e-7  # the step's loss is taken at the initial weights
    sft = actor.train_sft(samples, num_steps=2)
    assert sft["train/grad_norm"] > 0

    old = actor.compute_logprobs(samples, TEMPERATURE)
    ref = actor.compute_ref_logprobs(samples, TEMPERATURE)
    assert max_diff(old, ref0) > 1e-2  # the actor moved ...
    assert all(torch.equal(r, r0) for r, r0 in zip(ref, ref0))  # ... the reference did not
    kl_history = []
    for _ in range(3):  # zero advantages: only the KL term has a gradient, and it pulls back to pi_ref
        zeros = [torch.zeros(len(s.response_tokens)) for s in samples]
        metrics = actor.train_rl(samples, zeros, old, ref_logprobs=ref, temperature=TEMPERATURE)
        kl_history.append(metrics["train/kl_loss"])
        old = actor.compute_logprobs(samples, TEMPERATURE)
    expected = kl_estimate(torch.cat(old), torch.cat(ref), "k3")
    print(f"k3 KL to the reference over KL-only steps: {kl_history}, after: {expected.mean().item():.4g}")
    assert kl_history[0] > 1e-3
    assert kl_history[-1] < 0.5 * kl_history[0], kl_history
    assert all(torch.equal(r, r0) for r, r0 in zip(actor.compute_ref_logprobs(samples, TEMPERATURE), ref0))


def test_reward_level_kl_builds_a_bf16_reference(megatron_tp1, checkpoint):
    algo = AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.05)
    actor = make_actor(megatron_tp1, checkpoint, algo, bf16=True)
    samples = make_samples()
    assert actor.needs_reference and not actor.algo_cfg.use_kl_loss
    assert {p.dtype for p in actor.ref_model.parameters()} == {torch.bfloat16}
    ref = actor.compute_ref_logprobs(samples, TEMPERATURE)
    assert all(r.dtype == torch.float32 for r in ref)
    assert all(torch.equal(r, o) for r, o in zip(ref, actor.compute_logprobs(samples, TEMPERATURE)))


def test_no_reference_without_kl_settings(megatron_tp1, checkpoint):
    actor = make_actor(megatron_tp1, checkpoint, AlgoConfig(kl_estimator="k3"))
    assert not actor.needs_reference and actor.ref_model is None
    with pytest.raises(RuntimeError, match="no reference model: it is built only when algo.use_kl_loss"):
        actor.compute_ref_logprobs(make_samples(), TEMPERATURE)
