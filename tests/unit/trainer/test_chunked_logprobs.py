"""trainer.logprob_impl=chunked: the actor's log-probs, entropy and train steps from the final hidden
states through miles.kernels.logprob_entropy equal those of the full-vocabulary logits (one gloo
rank, TP=1; TP=2 is tests/integration/trainer/test_chunked_tp2.py).

Checkpoints are the tiny Qwen3 (vocab 512, hidden 64) with weights redrawn at std 0.2, untied and
tied (then the output weight is the embedding's and gets gradient from both uses), and the tiny
Qwen3-MoE for R3. fp32 throughout except the bf16 test.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miles.algo.config import AlgoConfig
from miles.errors import ConfigError
from miles.rollout.sample import Sample
from miles.routing.replay import RoutingReplay
from miles.trainer.actor import MegatronActor
from miles.trainer.config import TrainerConfig
from miles.trainer.logprobs import build_padded_batch, model_forward

TEMPERATURE = 0.7
PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302], [42], [1, 2, 3, 4, 5, 6, 7], [77, 78]]
RESPONSES = [[11, 12, 13, 14], [3], [400, 401, 402, 403, 404, 405], [7, 8, 9], [20, 21], [30, 31, 32, 33, 34]]
REPO_TOOL = "tools/make_tiny_model.py"


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory, redrawn_checkpoint):
    out = tmp_path_factory.mktemp("chunked") / "qwen3-tiny-std02"
    redrawn_checkpoint(tiny_model, out)
    return out


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory, redrawn_checkpoint):
    repo = Path(__file__).resolve().parents[3]
    src = tmp_path_factory.mktemp("chunked-tied") / "qwen3-tiny-tied"
    subprocess.run([sys.executable, str(repo / REPO_TOOL), str(src), "--tie-embeddings"], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = src.parent / "qwen3-tiny-tied-std02"
    state = redrawn_checkpoint(src, out)
    assert "lm_head.weight" not in state  # tied: the output layer is the embedding
    return out


@pytest.fixture(scope="module")
def moe_checkpoint(tiny_moe_model, tmp_path_factory, redrawn_checkpoint):
    out = tmp_path_factory.mktemp("chunked-moe") / "qwen3-moe-std02"
    redrawn_checkpoint(tiny_moe_model, out)
    return out


def make_samples(n: int = len(PROMPTS)) -> list[Sample]:
    return [Sample(group_id=i // 2, index=i % 2, prompt_tokens=p, response_tokens=r,
                   loss_mask=[1] * (len(r) - 1) + [0] if len(r) > 1 else [1])
            for i, (p, r) in enumerate(zip(PROMPTS[:n], RESPONSES[:n]))]


def make_actor(megatron_tp1, checkpoint, impl: str, algo: AlgoConfig | None = None, routing_source=None,
               **trainer) -> MegatronActor:
    cfg = TrainerConfig(**{"lr": 1e-3, "micro_batch_size": 2, "logprob_impl": impl, **trainer})
    return MegatronActor(str(checkpoint), cfg, algo or AlgoConfig(), megatron_tp1, routing_source=routing_source)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def weights(actor: MegatronActor) -> dict[str, torch.Tensor]:
    return {name: t.detach().float().clone() for name, t in actor.export_hf_weights()}


def worst_relative_update_error(got: dict, ref: dict, before: dict) -> float:
    """max over tensors of |dW_got - dW_ref| / |dW_ref| (Frobenius), dW = weights after - before."""
    return max(((got[k] - before[k]) - (ref[k] - before[k])).norm().item() / (ref[k] - before[k]).norm().item()
               for k in before if (ref[k] - before[k]).norm() > 0)


def assert_same_metrics(got: dict, ref: dict, keys: tuple[str, ...], rel: float = 1e-5) -> None:
    for key in keys:
        assert abs(got[key] - ref[key]) <= rel * abs(ref[key]) + 1e-7, (key, got[key], ref[key])


def test_config_rejects_unknown_impl():
    assert TrainerConfig().logprob_impl == "full"
    with pytest.raises(ConfigError, match=r"trainer.logprob_impl='fused' is not one of 'full', 'chunked'"):
        TrainerConfig(logprob_impl="fused")


def test_sharded_kernel_call_needs_its_group():
    from miles.kernels.logprob_entropy import logprob_entropy

    hidden_NH, weight_VH, targets_N = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 9, 2])
    with pytest.raises(ValueError, match=r"vocab_start=5 needs the group the vocabulary is sharded over"):
        logprob_entropy(hidden_NH, weight_VH, targets_N, vocab_start=5)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 5\), found \[9\]"):
        logprob_entropy(hidden_NH, weight_VH, targets_N)


def test_chunked_forward_returns_hidden_states_and_never_runs_the_output_layer(megatron_tp1, checkpoint):
    actor = make_actor(megatron_tp1, checkpoint, "chunked")
    gpt = actor.model.module
    calls = []
    hook = gpt.output_layer.register_forward_hook(lambda *args: calls.append(1))
    batch = build_padded_batch(PROMPTS[:2], RESPONSES[:2], pad_id=actor.pad_id,
                               device=megatron_tp1.device)  # B = 2, S = 9
    try:
        with torch.no_grad():
            chunked = model_forward(actor.model, batch, "chunked")
            assert calls == [] and gpt.post_process  # restored after the call
            full = model_forward(actor.model, batch, "full")
    finally:
        hook.remove()
    assert calls == [1]
    assert chunked.logits_BSVp is None and tuple(chunked.hidden_SBH.shape) == (9, 2, 64)
    assert chunked.output_weight_VpH is gpt.output_layer.weight
    # the hidden states are the output layer's input: hidden @ W^T reproduces the full logits
    logits_BSV = torch.einsum("sbh,vh->bsv", chunked.hidden_SBH, chunked.output_weight_VpH)
    assert tuple(full.logits_BSVp.shape) == (2, 9, 512)
    torch.testing.assert_close(logits_BSV, full.logits_BSVp, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_compute_logprobs_and_entropy_equal_full(megatron_tp1, checkpoint, tied_checkpoint, tied):
    ckpt = tied_checkpoint if tied else checkpoint
    samples = make_samples()
    full_lp, full_ent = make_actor(megatron_tp1, ckpt, "full").compute_logprobs(samples, TEMPERATURE, True)
    chunked = make_actor(megatron_tp1, ckpt, "chunked")
    if tied:
        assert chunked.model.module.share_embeddings_and_output_weights
    lp, ent = chunked.compute_logprobs(samples, TEMPERATURE, with_entropy=True)
    print(f"\ntied={tied}: max |dlogp| {max_diff(lp, full_lp):.2e} max |dH| {max_diff(ent, full_ent):.2e}")
    assert max_diff(lp, full_lp) < 1e-5 and max_diff(ent, full_ent) < 1e-5
    assert min(t.min().item() for t in full_lp) < -3  # far from a flat distribution: the check can fail
    # temperature reaches the kernel: at T = 1 the log-probs move by far more than the tolerance
    assert max_diff(chunked.compute_logprobs(samples, 1.0), full_lp) > 0.1


@pytest.mark.parametrize("tied", [False, True])
def test_rl_step_equals_full(megatron_tp1, checkpoint, tied_checkpoint, tied):
    """Entropy bonus (entropy gradient through the kernel), KL loss (the reference model runs chunked
    too), TIS, two optimizer steps: same metrics, grad norm, updated weights and log-probs after."""
    ckpt = tied_checkpoint if tied else checkpoint
    algo = AlgoConfig(eps_clip_high=0.28, entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1, use_tis=True,
                      loss_reduction="token_mean")
    samples = make_samples()
    results = {}
    for impl in ("full", "chunked"):
        actor = make_actor(megatron_tp1, ckpt, impl, algo, global_batch_size=3, num_steps_per_rollout=2)
        before = weights(actor)
        old = actor.compute_logprobs(samples, TEMPERATURE)
        ref = actor.compute_ref_logprobs(samples, TEMPERATURE)
        gen = torch.Generator().manual_seed(0)
        rollout = [lp + 0.05 * torch.randn(lp.shape, generator=gen) for lp in old]
        advantages = [torch.full(lp.shape, 1.0 if i % 2 else -0.5) for i, lp in enumerate(old)]
        metrics = actor.train_rl(samples, advantages, old, rollout, [r - 0.1 for r in ref], temperature=TEMPERATURE)
        results[impl] = (metrics, weights(actor), actor.compute_logprobs(samples, TEMPERATURE), old, ref)
    (m_full, w_full, after_full, old_full, ref_full), (m, w, after, old, ref) = results["full"], results["chunked"]
    print(f"\ntied={tied}: loss {m['train/loss']:.7f} vs {m_full['train/loss']:.7f}, grad_norm "
          f"{m['train/grad_norm']:.7f} vs {m_full['train/grad_norm']:.7f}, max |dw| "
          f"{max((w[k] - w_full[k]).abs().max().item() for k in w):.2e}, rel update err "
          f"{worst_relative_update_error(w, w_full, before):.2e}, max |dlogp_after| {max_diff(after, after_full):.2e}")
    assert max_diff(old, old_full) < 1e-5 and max_diff(ref, ref_full) < 1e-5
    assert m_full["train/skipped_steps"] == 0 and m_full["train/grad_norm"] > 0.1
    assert m_full["train/entropy"] > 0.5 and m_full["train/kl_loss"] > 0
    assert_same_metrics(m, m_full, ("train/loss", "train/pg_loss", "train/entropy", "train/kl_loss", "train/tis",
                                    "train/grad_norm", "train/num_tokens"))
    moved = max((w_full[k] - before[k]).abs().max().item() for k in before)
    assert moved > 5e-4, moved  # the steps changed the weights
    # Adam's first steps are ~lr * sign(g): fp32 reduction-order noise in near-zero gradients moves a few
    # weights by a fraction of lr; a real mistake moves them by ~lr = 1e-3 and the update direction by far more.
    assert max((w[k] - w_full[k]).abs().max().item() for k in w) < 1e-5
    assert worst_relative_update_error(w, w_full, before) < 1e-3
    assert max_diff(after_full, old_full) > 1e-2  # the steps moved the log-probs
    assert max_diff(after, after_full) < 5e-5


def test_sft_step_equals_full(megatron_tp1, checkpoint):
    samples = make_samples(4)
    results = {}
    for impl in ("full", "chunked"):
        actor = make_actor(megatron_tp1, checkpoint, impl)
        before = weights(actor)
        metrics = actor.train_sft(samples, lr=1e-3, num_steps=2)
        results[impl] = (metrics, weights(actor))
    (m_full, w_full), (m, w) = results["full"], results["chunked"]
    print(f"\nSFT loss {m['train/loss']:.7f} vs {m_full['train/loss']:.7f}, grad_norm {m['train/grad_norm']:.7f} vs "
          f"{m_full['train/grad_norm']:.7f}, max |dw| {max((w[k] - w_full[k]).abs().max().item() for k in w):.2e}")
    assert m_full["train/loss"] > 1 and m_full["train/grad_norm"] > 0.1
    assert_same_metrics(m, m_full, ("train/loss", "train/grad_norm", "train/num_tokens"))
    assert max((w[k] - w_full[k]).abs().max().item() for k in w) < 1e-5
    assert worst_relative_update_error(w, w_full, before) < 1e-3


def test_bf16_chunked_trains_close_to_full(megatron_tp1, checkpoint):
    """bf16 (Float16Module): the hidden states come back upcast and are cast to the bf16 weight;
    the full path rounds its logits to bf16, the kernel does not, hence the looser tolerances."""
    samples = make_samples(4)
    results = {}
    for impl in ("full", "chunked"):
        actor = make_actor(megatron_tp1, checkpoint, impl, bf16=True, global_batch_size=4)
        old = actor.compute_logprobs(samples, TEMPERATURE)
        metrics = actor.train_rl(samples, [torch.ones_like(lp) for lp in old], old, temperature=TEMPERATURE)
        results[impl] = (old, metrics, dict(actor.export_hf_weights()))
    (old_full, m_full, _), (old, m, w) = results["full"], results["chunked"]
    print(f"\nbf16: max |dlogp| {max_diff(old, old_full):.2e}, grad_norm {m['train/grad_norm']:.5f} vs "
          f"{m_full['train/grad_norm']:.5f}")
    assert m["train/skipped_steps"] == 0 and {t.dtype for t in w.values()} == {torch.bfloat16}
    assert max_diff(old, old_full) < 0.05
    assert abs(m["train/grad_norm"] - m_full["train/grad_norm"]) < 1e-2 * m_full["train/grad_norm"]


# -- R3 on the tiny MoE -----------------------------------------------------------------------------
def recorded_routing(actor: MegatronActor, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """The trainer's own free routing of each sample, [prompt + response - 1, L, K] (what the engine dumps)."""
    replay = RoutingReplay(actor.model)
    dumps = {}
    actor.model.eval()
    for sample in samples:
        ids = torch.tensor([sample.prompt_tokens + sample.response_tokens], device=actor.parallel.device)
        replay.record()
        with torch.no_grad():
            actor.model(ids, torch.arange(ids.shape[1], device=ids.device)[None], None)
        dumps[sample.sample_id] = torch.stack(replay.recorded(), dim=1)[:-1].int().cpu()
        replay.clear()
    actor.model.train()
    return dumps


def test_r3_replay_works_with_chunked(megatron_tp1, moe_checkpoint):
    samples = make_samples(4)
    free = make_actor(megatron_tp1, moe_checkpoint, "chunked")
    dumps = recorded_routing(free, samples)
    plain = free.compute_logprobs(samples, TEMPERATURE)

    def source(dumps):
        return lambda chosen: [dumps[s.sample_id] for s in chosen]

    shifted = {k: (v + 1) % 8 for k, v in dumps.items()}
    replayed = make_actor(megatron_tp1, moe_checkpoint, "chunked", routing_source=source(dumps))
    assert max_diff(replayed.compute_logprobs(samples, TEMPERATURE), plain) < 1e-5
    other = make_actor(megatron_tp1, moe_checkpoint, "chunked", routing_source=source(shifted))
    assert max_diff(other.compute_logprobs(samples, TEMPERATURE), plain) > 1e-2

    # One RL step replaying experts the router would not pick, with recomputation (the backward replays
    # them again): chunked equals full.
    results = {}
    for impl in ("full", "chunked"):
        actor = make_actor(megatron_tp1, moe_checkpoint, impl, AlgoConfig(entropy_coef=0.01),
                           routing_source=source(shifted), recompute_granularity="full", lr=1e-2)
        before = weights(actor)
        old = actor.compute_logprobs(samples, TEMPERATURE)
        advantages = [torch.full(lp.shape, 1.0 if i % 2 else -1.0) for i, lp in enumerate(old)]
        metrics = actor.train_rl(samples, advantages, old, temperature=TEMPERATURE)
        results[impl] = (old, metrics, weights(actor))
    (old_full, m_full, w_full), (old, m, w) = results["full"], results["chunked"]
    print(f"\nR3: loss {m['train/loss']:.7f} vs {m_full['train/loss']:.7f}, grad_norm {m['train/grad_norm']:.7f} vs "
          f"{m_full['train/grad_norm']:.7f}, max |dw| {max((w[k] - w_full[k]).abs().max().item() for k in w):.2e}, "
          f"rel update err {worst_relative_update_error(w, w_full, before):.2e}")
    assert max_diff(old, old_full) < 1e-5
    assert m_full["train/grad_norm"] > 0.1
    assert_same_metrics(m, m_full, ("train/loss", "train/pg_loss", "train/entropy", "train/grad_norm"))
    assert max((w[k] - w_full[k]).abs().max().item() for k in w) < 1e-3  # lr 1e-2: Adam noise, as above
    assert worst_relative_update_error(w, w_full, before) < 1e-3
