"""Train-infer mismatch: how far the engine's logprobs are from the trainer's on the same tokens.

The number RL practitioners watch: right after a weight sync both sides hold the same weights, so
the difference is pure numerics (fp32 on CPU: ~1e-6; bf16 engines: ~1e-2). A jump means a broken
sync, a wrong temperature, or a different tokenization.
"""

import torch


def train_infer_mismatch(rollout_logprobs: list[list[float]], trainer_logprobs: list[torch.Tensor]) -> dict[str, float]:
    """Mean and max |engine - trainer| over every response token of the step's samples."""
    assert len(rollout_logprobs) == len(trainer_logprobs), "one logprob list per sample on both sides"
    diffs = []
    for engine_lp, train_lp in zip(rollout_logprobs, trainer_logprobs):
        assert len(engine_lp) == train_lp.numel(), (len(engine_lp), train_lp.numel())
        diffs.append((torch.tensor(engine_lp, dtype=torch.float64) - train_lp.detach().double().cpu()).abs())
    if not diffs:
        return {}
    all_diffs = torch.cat(diffs)
    if all_diffs.numel() == 0:
        return {}
    return {"mismatch/mean": all_diffs.mean().item(), "mismatch/max": all_diffs.max().item()}
