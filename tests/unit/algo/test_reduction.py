"""Loss reductions with ragged masks; masked positions hold garbage that must not leak in."""

import pytest
import torch

from miles.algo.reduction import reduce_loss

F64 = torch.float64
# Rows of 4, 2 and 1 trained tokens; 100 marks masked garbage.
X = torch.tensor([[1, 2, 3, 4], [10, 20, 100, 100], [5, 100, 100, 100]], dtype=F64)
M = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def test_token_mean():
    # (1+2+3+4 + 10+20 + 5) / 7 = 45/7
    assert abs(reduce_loss(X, M, "token_mean").item() - 45 / 7) < 1e-12


def test_sample_mean():
    # per-sample means 2.5, 15, 5 -> (2.5 + 15 + 5) / 3 = 7.5
    assert abs(reduce_loss(X, M, "sample_mean").item() - 7.5) < 1e-12


def test_constant_normalizer_dr_grpo():
    # 45 / (3 samples x 4 tokens) = 3.75, independent of the individual lengths
    assert abs(reduce_loss(X, M, "constant", constant_normalizer=4).item() - 3.75) < 1e-12
    with pytest.raises(ValueError, match="constant_normalizer"):
        reduce_loss(X, M, "constant")


def test_fully_masked_sample():
    # extra row [7,7,7,7] all masked: sample_mean (2.5+15+5+0)/4 = 5.625; token_mean still 45/7
    x = torch.cat([X, torch.full((1, 4), 7.0, dtype=F64)])
    m = torch.cat([M, torch.zeros(1, 4, dtype=M.dtype)])
    assert abs(reduce_loss(x, m, "sample_mean").item() - 5.625) < 1e-12
    assert abs(reduce_loss(x, m, "token_mean").item() - 45 / 7) < 1e-12


def test_micro_batches_with_global_normalizers_sum_to_full_batch():
    for mode, kwargs in (("token_mean", {"num_tokens": 7}), ("sample_mean", {"num_samples": 3}),
                         ("constant", {"num_samples": 3, "constant_normalizer": 4})):
        full = reduce_loss(X, M, mode, constant_normalizer=kwargs.get("constant_normalizer"))
        parts = reduce_loss(X[:1], M[:1], mode, **kwargs) + reduce_loss(X[1:], M[1:], mode, **kwargs)
        assert abs(parts.item() - full.item()) < 1e-12, mode


def test_sample_split_across_ranks_uses_whole_sample_count():
    # sample [1,2,3,4] split into [1,2] and [3,4] (e.g. two context-parallel ranks), whole count 4:
    # 3/4 + 7/4 = 2.5 = the sample's mean
    counts = torch.tensor([4.0], dtype=F64)
    a = reduce_loss(X[:1, :2], M[:1, :2], "sample_mean", sample_token_counts_B=counts)
    b = reduce_loss(X[:1, 2:], M[:1, 2:], "sample_mean", sample_token_counts_B=counts)
    assert abs((a + b).item() - 2.5) < 1e-12


def test_gradient_flows_only_to_trained_tokens():
    # sample_mean: d/dx_bt = 1 / (B * L_b) on trained tokens: rows 1/12, 1/6, 1/3; 0 elsewhere
    x = X.clone().requires_grad_(True)
    reduce_loss(x, M, "sample_mean").backward()
    expected = M.to(F64) / (3 * M.sum(1, keepdim=True).to(F64))
    torch.testing.assert_close(x.grad, expected)


def test_errors():
    with pytest.raises(ValueError, match="token_mean, sample_mean, constant"):
        reduce_loss(X, M, "seq_sum")
    with pytest.raises(ValueError, match="differ in shape"):
        reduce_loss(X, M[:, :2], "token_mean")
