"""Two real gloo ranks at TP=2 vs one rank at TP=1, both loaded from the same HF checkpoint."""

from pathlib import Path

import torch

WORKER = Path(__file__).with_name("tp_worker.py")


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_tp2_matches_tp1_and_exports_exact_hf_weights(tiny_model, tmp_path, gloo_ranks, redrawn_checkpoint):
    original = redrawn_checkpoint(tiny_model, tmp_path / "ckpt")
    (tp1,), _ = gloo_ranks(WORKER, [tmp_path / "ckpt", tmp_path / "tp1", 1], tmp_path / "tp1", 1)
    tp2, _ = gloo_ranks(WORKER, [tmp_path / "ckpt", tmp_path / "tp2", 2], tmp_path / "tp2", 2)

    assert [r["tp_rank"] for r in tp2] == [0, 1]
    assert [t.shape for t in tp1["logprobs"]] == [(3,), (5,)]
    assert max(t.abs().max().item() for t in tp1["logprobs"]) > 1.0  # a sharp, non-uniform distribution
    for rank in tp2:
        assert max_diff(rank["logprobs"], tp1["logprobs"]) < 1e-5
        assert max_diff(rank["entropy"], tp1["entropy"]) < 1e-5
        assert rank["weights"].keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(rank["weights"][name], tensor), name
        assert rank["grads"].keys() == original.keys()
        for name, grad in tp1["grads"].items():  # vocab-parallel CE + entropy backward agree with TP=1
            assert (rank["grads"][name] - grad).abs().max().item() < 1e-5 * max(1.0, grad.abs().max().item()), name
