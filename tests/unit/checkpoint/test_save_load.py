"""save_checkpoint / load_checkpoint with a real MegatronActor on one gloo rank (TP=1).

A fresh actor loaded from a checkpoint must be indistinguishable from the one that saved it:
same weights and Adam state bit for bit, same lr schedule position, same RNG streams, and the
same next training step. Damaged checkpoints are skipped with a warning that names the file.
"""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from miles.algo.config import AlgoConfig
from miles.checkpoint.store import CheckpointError, load_checkpoint, save_checkpoint
from miles.errors import ConfigError
from miles.rollout.sample import Sample, SampleStatus
from miles.trainer.actor import MegatronActor
from miles.trainer.config import TrainerConfig

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [[5, 6, 7, 100], [9, 10], [300, 301, 302], [42]]
RESPONSES = [[11, 12, 13], [3, 4, 500, 501], [400, 401], [7, 8, 9, 10, 11]]
CONFIG_YAML = "run:\n  seed: 1234\n"


def make_actor(parallel, model_path) -> MegatronActor:
    # warmup 4: the lr of the next step depends on the restored scheduler; weight decay exercises AdamW
    cfg = TrainerConfig(lr=1e-3, lr_warmup_steps=4, weight_decay=0.01, global_batch_size=4, num_steps_per_rollout=1,
                        micro_batch_size=2)
    return MegatronActor(str(model_path), cfg, AlgoConfig(), parallel)


def samples() -> list[Sample]:
    return [Sample(group_id=i // 2, index=i % 2, prompt_tokens=p, response_tokens=r)
            for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]


def weights(actor) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in actor.model.module.state_dict().items()
            if isinstance(t, torch.Tensor) and not name.endswith("_extra_state")}


def adam_state(actor) -> dict:
    state = actor.optimizer.state_dict()["state"]
    return {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for i, s in state.items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        else:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def draws() -> tuple:
    return torch.rand(4), random.random(), np.random.rand(3)


@pytest.fixture(scope="module")
def trained(megatron_tp1, tiny_model, tmp_path_factory):
    """An actor after one scheduled step, saved as step 1; what it does next, uninterrupted."""
    root = tmp_path_factory.mktemp("ckpt")
    actor = make_actor(megatron_tp1, tiny_model)
    actor.train_sft(samples())
    pending = [Sample(group_id=9, index=0, prompt_tokens=[1, 2], response_tokens=[3], reward=0.5,
                   status=SampleStatus.COMPLETED).to_dict()]
    rl_state = {"data_source": {"epoch": 0, "cursor": 3, "next_group_id": 3, "num_rows": 10}, "pending": pending}
    saved = {"weights": weights(actor), "adam": adam_state(actor), "rl_state": rl_state,
             "lr": actor.optimizer.param_groups[0]["lr"]}
    saved["path"] = save_checkpoint(root, 1, actor, rl_state, CONFIG_YAML)
    saved["draws"] = draws()
    saved["next_metrics"] = actor.train_sft(samples())
    saved["next_weights"] = weights(actor)
    return root, saved


def test_fresh_actor_resumes_bit_identically(megatron_tp1, tiny_model, trained):
    root, saved = trained
    assert saved["path"] == root / "step_00000001"
    assert sorted(p.relative_to(saved["path"]).as_posix() for p in saved["path"].rglob("*") if p.is_file()) == [
        "config.yaml", "dist/.metadata", "dist/__0_0.distcp", "dist/__0_1.distcp", "dist/common.pt",
        "dist/metadata.json", "manifest.json", "rl_state.json", "rng/rank_0.pt", "trainer_state.json"]
    assert (saved["path"] / "config.yaml").read_text() == CONFIG_YAML

    fresh = make_actor(megatron_tp1, tiny_model)
    assert fresh.num_optimizer_steps == 0
    step, rl_state = load_checkpoint(root, fresh)
    assert all(np.array_equal(a, b) for a, b in zip(draws(), saved["draws"]))  # RNG as right after the save
    assert step == 1 and rl_state == saved["rl_state"]
    assert Sample.from_dict(rl_state["pending"][0]).status == SampleStatus.COMPLETED
    assert_same_tensors(weights(fresh), saved["weights"])
    assert_same_tensors(adam_state(fresh), saved["adam"])
    assert adam_state(fresh)[0]["step"] == 1  # Adam's bias correction continues from step 1
    assert fresh.num_optimizer_steps == 1 and fresh.optimizer.param_groups[0]["lr"] == saved["lr"]

    metrics = fresh.train_sft(samples())
    assert metrics["train/lr"] == saved["next_metrics"]["train/lr"] == 5e-4  # warmup step 2 of 4
    assert metrics["train/loss"] == saved["next_metrics"]["train/loss"]
    assert metrics["train/grad_norm"] == saved["next_metrics"]["train/grad_norm"]
    assert_same_tensors(weights(fresh), saved["next_weights"])
    assert any(not torch.equal(saved["weights"][k], saved["next_weights"][k]) for k in saved["weights"])


def test_damaged_checkpoints_are_skipped_with_a_warning(megatron_tp1, tiny_model, trained, tmp_path, caplog):
    saved = trained[1]
    root = tmp_path / "ckpt"
    shutil.copytree(trained[0], root)
    actor = make_actor(megatron_tp1, tiny_model)
    save_checkpoint(root, 2, actor, {"cursor": 2}, CONFIG_YAML)
    save_checkpoint(root, 3, actor, {"cursor": 3}, CONFIG_YAML, keep_last=3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002", "step_00000003"]
    shard = root / "step_00000003" / "dist" / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    rng_file = root / "step_00000002" / "rng" / "rank_0.pt"
    data = bytearray(rng_file.read_bytes())
    data[-20] ^= 0x55
    rng_file.write_bytes(bytes(data))

    fresh = make_actor(megatron_tp1, tiny_model)
    with caplog.at_level("WARNING"):
        step, rl_state = load_checkpoint(root, fresh)
    assert step == 1 and rl_state == saved["rl_state"]
    assert_same_tensors(weights(fresh), saved["weights"])
    assert f"truncated {shard}: expected {size} bytes, got {size // 2}" in caplog.text
    assert f"checksum mismatch in {rng_file}: expected sha256 " in caplog.text
    assert "resuming from step 1 (step_00000001) instead of step_00000003, step_00000002" in caplog.text

    os.truncate(root / "step_00000001" / "rl_state.json", 0)
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        load_checkpoint(root, fresh)


def test_no_checkpoint_is_a_fresh_start(megatron_tp1, tiny_model, tmp_path):
    actor = make_actor(megatron_tp1, tiny_model)
    assert load_checkpoint(tmp_path / "missing", actor) is None
    assert load_checkpoint(tmp_path, actor) is None


def test_a_different_model_is_a_config_error(megatron_tp1, tiny_model, trained, tmp_path):
    root, _ = trained
    wider = tmp_path / "wider"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(wider), "--hidden", "128"],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    other = make_actor(megatron_tp1, wider)
    with pytest.raises(ConfigError, match=r"saved for a different model:\n  hidden_size: checkpoint 64, this run "
                                          r"128(.|\n)*Fix: resume with the model.path"):
        load_checkpoint(root, other)


def test_rl_state_must_be_json(megatron_tp1, tiny_model, tmp_path):
    actor = make_actor(megatron_tp1, tiny_model)
    with pytest.raises(ValueError, match="rl_state must be JSON-serialisable"):
        save_checkpoint(tmp_path, 1, actor, {"pending": [samples()[0]]}, CONFIG_YAML)
    assert not any(tmp_path.iterdir())
