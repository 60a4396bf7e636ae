"""The megatron-core CPU shims: the upstream check and what each shim changes."""

import pytest
import torch

from miles.trainer import cpu_compat
from miles.trainer.cpu_compat import UpstreamChanged, check_upstream

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for CPU-only processes")


def test_check_upstream_passes_on_pinned_megatron():
    import megatron.core

    assert megatron.core.__version__ == "0.16.1"
    check_upstream()


def test_check_upstream_names_a_missing_patched_symbol(monkeypatch):
    from megatron.core.optimizer import clip_grads

    monkeypatch.delattr(clip_grads, "clip_grad_by_total_norm_fp32")
    with pytest.raises(UpstreamChanged, match=r"\[S5 CLIPGRAD\] megatron\.core\.optimizer\.clip_grads\."
                                              r"clip_grad_by_total_norm_fp32 no longer exists"):
        check_upstream()


def test_check_upstream_names_a_missing_rng_function(monkeypatch):
    from megatron.core.tensor_parallel import random as mc_random

    monkeypatch.delattr(mc_random, "_set_cuda_rng_state")
    with pytest.raises(UpstreamChanged, match=r"\[S7 CPURNG\].*_set_cuda_rng_state no longer exists"):
        check_upstream()


def test_check_upstream_names_changed_source(monkeypatch):
    from megatron.core.transformer import utils as mc_utils

    def get_default_causal_mask(sq: int) -> torch.Tensor:  # upstream "fixed": no hard-coded device
        return torch.ones(sq, sq).triu(1).bool()

    monkeypatch.setattr(mc_utils, "get_default_causal_mask", get_default_causal_mask)
    with pytest.raises(UpstreamChanged) as info:
        check_upstream()
    message = str(info.value)
    assert "[S2 CUDASTR] megatron.core.transformer.utils.get_default_causal_mask no longer contains " \
           "'device=\"cuda\"'" in message
    assert message.count("\n") == 1  # exactly one problem reported


def test_check_upstream_names_changed_signature(monkeypatch):
    from megatron.core.optimizer import optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm):  # lost use_decoupled_grad
        """Stand-in with the assert text: torch.cuda.FloatTensor"""

    monkeypatch.setattr(optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)
    monkeypatch.delitem(cpu_compat._ORIGINALS, ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
                        raising=False)
    with pytest.raises(UpstreamChanged, match=r"optimizer\.optimizer\.clip_grad_by_total_norm_fp32 parameters are "
                                              r"\('parameters', 'max_norm', 'total_norm'\)"):
        check_upstream()


@cpu_only
def test_apply_is_idempotent_and_each_shim_acts():
    cpu_compat.apply_cpu_compat()
    cpu_compat.apply_cpu_compat()
    assert cpu_compat.is_applied()
    check_upstream()  # still passes on the patched modules

    from megatron.core.optimizer.optimizer import clip_grad_by_total_norm_fp32
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.utils import get_default_causal_mask

    assert torch.cuda.current_device() == torch.device("cpu")  # S1
    mask = get_default_causal_mask(3)  # S2 inside megatron
    assert mask.device.type == "cpu" and mask.tolist() == [[False, True, True], [False, False, True],
                                                           [False, False, False]]
    with pytest.raises((RuntimeError, AssertionError)):  # S2 does not leak out of megatron's modules
        torch.zeros(1, device="cuda")
    t = torch.ones(2)
    assert t.cuda() is t
    torch.cuda.synchronize()  # S3
    assert moe_utils.te_general_gemm is None  # S4

    p = torch.nn.Parameter(torch.zeros(4))  # S5: total norm 4, max norm 1 -> grads scaled by ~1/4
    p.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)

    mc_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)  # S7
    tracker = mc_random.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    mc_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    with mc_random.get_cuda_rng_tracker().fork():
        again = torch.rand(3)
    assert torch.equal(first, again)
    torch.set_rng_state(before)
