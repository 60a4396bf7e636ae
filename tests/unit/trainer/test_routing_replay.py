"""R3 in the trainer (miles/routing/replay.py + MegatronActor.routing_source), one gloo rank.

- the trainer's own routing (megatron RECORD) equals the experts a hook on the engine's HF router
  captured, token for token, so the alignment of dumps to megatron's [S*B] rows is exact;
- replaying the captured experts reproduces the trainer's log-probs, other experts change them;
- activation recomputation replays the same experts in backward: one RL step with recompute equals
  one without, and breaking the backward replay changes the result (so the check can fail);
- shape checks name the sample.

The checkpoint is the tiny Qwen3-MoE with weights redrawn at std 0.2, so router logits are spread
out and the trainer and HF agree on every top-k choice (no near-ties).
"""


import numpy as np
import pytest
import torch

from miles.algo.config import AlgoConfig
from miles.rollout.sample import Sample
from miles.routing.replay import RoutingReplay, RoutingReplayError, replay_targets
from miles.trainer.actor import MegatronActor
from miles.trainer.config import TrainerConfig
from miles.trainer.logprobs import build_padded_batch

PROMPTS = [[5, 6, 7, 100, 200], [9, 10], [300, 301, 302], [42]]
RESPONSES = [[11, 12, 13, 14], [3], [400, 401, 402, 403, 404, 405], [7, 8, 9]]


@pytest.fixture(scope="module")
def moe_checkpoint(tiny_moe_model, tmp_path_factory, redrawn_checkpoint):
    out = tmp_path_factory.mktemp("r3") / "qwen3-moe-std02"
    redrawn_checkpoint(tiny_moe_model, out)
    return out


@pytest.fixture(scope="module")
def engine_dumps(moe_checkpoint) -> dict[str, np.ndarray]:
    """What the engine's router hook captures for each sample: [prompt + response - 1, L, K] int32."""
    from transformers import AutoModelForCausalLM

    from miles.engines.embedded.routing import RouterCapture

    model = AutoModelForCausalLM.from_pretrained(str(moe_checkpoint), dtype=torch.float32).eval()
    capture = RouterCapture(model)
    dumps = {}
    for sample in make_samples():
        ids = sample.prompt_tokens + sample.response_tokens
        with torch.no_grad():
            model(torch.tensor([ids]))
        dumps[sample.sample_id] = capture.take(len(ids))[:-1].numpy()  # the last token never went through
    capture.remove()
    return dumps


def make_samples() -> list[Sample]:
    return [Sample(group_id=i // 2, index=i % 2, prompt_tokens=p, response_tokens=r, loss_mask=[1] * len(r))
            for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]


def make_actor(megatron_tp1, checkpoint, source=None, **trainer) -> MegatronActor:
    cfg = TrainerConfig(**{"lr": 1e-2, **trainer})
    return MegatronActor(str(checkpoint), cfg, AlgoConfig(), megatron_tp1, routing_source=source)


def shifted(dumps: dict[str, np.ndarray], num_experts: int) -> dict[str, np.ndarray]:
    """Every token sent to other experts than the engine chose (each id + 1 mod E)."""
    return {k: (v + 1) % num_experts for k, v in dumps.items()}


def source_of(dumps: dict[str, np.ndarray]):
    return lambda samples: [dumps[s.sample_id] for s in samples]


def test_replay_targets_layout_and_padding():
    batch = build_padded_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)  # lengths 5 and 2, S = 5
    dumps = [np.arange(4 * 2 * 3).reshape(4, 2, 3) % 8, np.full((1, 2, 3), 7)]
    targets = replay_targets(batch, dumps, num_layers=2, top_k=3, num_experts=8)
    assert len(targets) == 2 and all(t.shape == (5 * 2, 3) for t in targets)
    for layer in range(2):
        rows_SBK = targets[layer].reshape(5, 2, 3)  # megatron flattens [S, B] sequence-major
        assert torch.equal(rows_SBK[:4, 0], torch.as_tensor(dumps[0][:, layer]))
        assert torch.equal(rows_SBK[:1, 1], torch.full((1, 3), 7))
        assert torch.equal(rows_SBK[4, 0], torch.arange(3)) and torch.equal(rows_SBK[1:, 1], torch.arange(3).expand(4, 3))


def test_replay_targets_reject_mismatched_dumps():
    batch = build_padded_batch([[1, 2]], [[4, 5]], pad_id=0)
    with pytest.raises(RoutingReplayError, match=r"sample 7-1 has shape \(4, 2, 3\), expected \(3, 2, 3\)"):
        replay_targets(batch, [np.zeros((4, 2, 3))], num_layers=2, top_k=3, num_experts=8, sample_ids=["7-1"])
    with pytest.raises(RoutingReplayError, match=r"sample 7-1 holds expert ids outside \[0, 8\)"):
        replay_targets(batch, [np.full((3, 2, 3), 8)], num_layers=2, top_k=3, num_experts=8, sample_ids=["7-1"])


def test_trainer_routing_equals_engine_router_hook(megatron_tp1, moe_checkpoint, engine_dumps):
    actor = make_actor(megatron_tp1, moe_checkpoint)
    model = actor.model
    replay = RoutingReplay(model)
    assert replay.num_layers == actor.hf_config.num_hidden_layers
    model.eval()
    compared = 0
    for sample in make_samples():
        ids = torch.tensor([sample.prompt_tokens + sample.response_tokens], device=megatron_tp1.device)
        replay.record()
        with torch.no_grad():
            model(ids, torch.arange(ids.shape[1], device=ids.device)[None], None)
        recorded_TLK = torch.stack(replay.recorded(), dim=1)[:-1].cpu()  # B = 1: rows are positions
        replay.clear()
        assert torch.equal(recorded_TLK, torch.as_tensor(engine_dumps[sample.sample_id], dtype=torch.long)), sample
        compared += recorded_TLK.numel()
    assert compared == sum(len(p) + len(r) - 1 for p, r in zip(PROMPTS, RESPONSES)) * 2 * 2


def test_replaying_captured_routing_reproduces_logprobs(megatron_tp1, moe_checkpoint, engine_dumps):
    samples = make_samples()
    plain = make_actor(megatron_tp1, moe_checkpoint).compute_logprobs(samples, temperature=0.7)
    replayed = make_actor(megatron_tp1, moe_checkpoint, source_of(engine_dumps),
                          micro_batch_size=3).compute_logprobs(samples, temperature=0.7)
    other = make_actor(megatron_tp1, moe_checkpoint, source_of(shifted(engine_dumps, 8)),
                       micro_batch_size=3).compute_logprobs(samples, temperature=0.7)
    same = max((a - b).abs().max().item() for a, b in zip(plain, replayed))
    moved = max((a - b).abs().max().item() for a, b in zip(plain, other))
    assert same < 1e-5, same
    assert moved > 1e-2, moved


def _one_rl_step(actor: MegatronActor) -> tuple[dict, dict[str, torch.Tensor]]:
    samples = make_samples()
    old = actor.compute_logprobs(samples)
    advantages = [torch.full((len(s.response_tokens),), 1.0 if i % 2 else -1.0) for i, s in enumerate(samples)]
    metrics = actor.train_rl(samples, advantages, old)
    return metrics, {n: t.detach().clone() for n, t in actor.export_hf_weights()}


def test_recompute_replays_the_same_experts_in_backward(megatron_tp1, moe_checkpoint, engine_dumps, monkeypatch):
    source = source_of(shifted(engine_dumps, 8))  # not what the router would pick: replay must hold
    base_metrics, base = _one_rl_step(make_actor(megatron_tp1, moe_checkpoint, source))
    rec_metrics, rec = _one_rl_step(make_actor(megatron_tp1, moe_checkpoint, source, recompute_granularity="full"))
    assert abs(base_metrics["train/loss"] - rec_metrics["train/loss"]) < 1e-6
    assert abs(base_metrics["train/grad_norm"] - rec_metrics["train/grad_norm"]) < 1e-5
    assert max((base[k] - rec[k]).abs().max().item() for k in base) < 1e-6
    # Control: a recomputation that routes on its own (no backward replay) trains something else.
    monkeypatch.setattr(RoutingReplay, "replay_backward", RoutingReplay.clear)
    broken_metrics, broken = _one_rl_step(make_actor(megatron_tp1, moe_checkpoint, source,
                                                     recompute_granularity="full"))
    assert abs(base_metrics["train/grad_norm"] - broken_metrics["train/grad_norm"]) > 1e-3
