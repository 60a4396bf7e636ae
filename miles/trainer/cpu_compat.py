"""The one place where megatron-core is adapted to run on CPU with gloo.

megatron-core 0.16.1 has no CPU mode, but its local (non-Transformer-Engine) path runs on CPU
once a handful of hard-coded CUDA calls are redirected. `apply_cpu_compat()` installs exactly
those redirections; the trainer entrypoint calls it only when `torch.cuda.is_available()` is
False. Nothing here runs at import.

Shims (each names the megatron-core 0.16.1 source it works around):

- S1 CURDEV: `torch.cuda.current_device()` returns the CPU device. Allocations use
  `device=torch.cuda.current_device()` throughout (rotary_pos_embedding.py:162 `inv_freq`,
  utils.py:631 GlobalMemoryBuffer, tensor_parallel/mappings.py gather buffers, DDP, optimizer).
- S2 CUDASTR: inside the megatron modules listed in `_CUDA_STRING_SITES`, tensor factories given
  `device="cuda"` allocate on the CPU (the module's global `torch` is replaced by a thin proxy;
  nothing outside those modules is affected; utils.py:1207 is the no-Apex grad-norm path), and
  `Tensor.cuda()` returns the tensor itself
  (language_module.py:244, optimizer.py:375, exchange_utils.py:336).
- S3 SYNC: `torch.cuda.synchronize()` is a no-op (filesystem_async.py:230 dist-checkpoint save,
  p2p_communication.py:242/398 pipeline p2p).
- S4 TEGEMM: `moe_utils.te_general_gemm = None`; the router GEMM (moe_utils.py:1192) reads a name
  that is only imported when Transformer Engine is installed (NameError in every MoE forward).
- S5 CLIPGRAD: `clip_grad_by_total_norm_fp32` (clip_grads.py:167, imported by name into
  optimizer.py:50) asserts `param.grad.type() == 'torch.cuda.FloatTensor'`; it is replaced by an
  equivalent without the assert.
- S7 CPURNG: the "CUDA" RNG used by megatron's RNG tracker is the CPU generator
  (tensor_parallel/random.py `_get_cuda_rng_state`, `_set_cuda_rng_state`,
  `CudaRNGStatesTracker.add` which calls `torch.cuda.get_rng_state()` at random.py:235), so
  `model_parallel_cuda_manual_seed`, TP-consistent dropout and activation recompute work.
- S9 CUDATYPE (scoped, not installed by `apply_cpu_compat`): `with cuda_type_strings():` around
  `get_megatron_optimizer` makes `Tensor.type()` of CPU tensors report `torch.cuda.<T>Tensor`;
  Float16OptimizerWithFloat16Params.__init__ (optimizer.py:671/690) and the DistributedOptimizer
  (distrib_optimizer.py:361/420) reject other type strings (bf16 training, distributed optimizer).

Not included (not needed yet): S6 (DistributedOptimizer checkpoint load with the torch AdamW
fallback), S8 (CUDA streams for the alltoall MoE dispatcher), S10 (sequence-parallel torch norm).

`check_upstream()` verifies that every symbol patched here still exists with the shape relied
on, and raises `UpstreamChanged` naming each difference; `apply_cpu_compat()` runs it first.
"""

import contextlib
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


class UpstreamChanged(RuntimeError):
    """megatron-core (or torch) no longer has the shape a CPU shim relies on."""


@dataclass(frozen=True)
class _Site:
    """A megatron-core function whose source must contain `needle` for a shim to be relevant."""

    shim: str
    """Shim id, e.g. "S5 CLIPGRAD"."""
    module: str
    """Dotted module path."""
    attr: str
    """Dotted attribute path inside the module (a function, class or method)."""
    needle: str
    """Source text that must still be present."""


# S2: modules whose hard-coded device="cuda" factories are redirected, with one witness each.
_CUDA_STRING_SITES = (
    _Site("S2 CUDASTR", "megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining",
          'device="cuda"'),
    _Site("S2 CUDASTR", "megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.__init__",
          "device='cuda'"),
    _Site("S2 CUDASTR", "megatron.core.optimizer.clip_grads", "get_grad_norm_fp32", "device='cuda'"),
    _Site("S2 CUDASTR", "megatron.core.utils", "local_multi_tensor_l2_norm", 'device="cuda"'),
    _Site("S2 CUDASTR", "megatron.core.optimizer.grad_scaler", "ConstantGradScaler.__init__",
          "device='cuda'"),
    _Site("S2 CUDASTR", "megatron.core.transformer.utils", "get_default_causal_mask", 'device="cuda"'),
    _Site("S2 CUDASTR", "megatron.core.dist_checkpointing.exchange_utils", "_get_empty_tensor_for_exchange",
          'device="cuda"'),
    _Site("S2 CUDASTR", "megatron.core.transformer.moe.moe_utils", "track_moe_metrics",
          'device="cuda"'),
)

_OTHER_SITES = (
    _Site("S1 CURDEV", "megatron.core.models.common.embeddings.rotary_pos_embedding",
          "RotaryEmbedding.get_emb", "torch.cuda.current_device()"),
    _Site("S3 SYNC", "megatron.core.dist_checkpointing.strategies.filesystem_async",
          "FileSystemWriterAsync.preload_tensors", "torch.cuda.synchronize()"),
    _Site("S4 TEGEMM", "megatron.core.transformer.moe.moe_utils", "RouterGatingLinearFunction.forward",
          "te_general_gemm is not None"),
    _Site("S5 CLIPGRAD", "megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
          "torch.cuda.FloatTensor"),
    _Site("S5 CLIPGRAD", "megatron.core.optimizer.optimizer", "MegatronOptimizer.clip_grad_norm",
          "clip_grad_by_total_norm_fp32("),
    _Site("S7 CPURNG", "megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add",
          "torch.cuda.get_rng_state()"),
    _Site("S7 CPURNG", "megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork",
          "_set_cuda_rng_state("),
    _Site("S9 CUDATYPE", "megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__",
          "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']"),
    _Site("S9 CUDATYPE", "megatron.core.optimizer.distrib_optimizer",
          "DistributedOptimizer._build_model_and_main_param_groups", "'torch.cuda.FloatTensor'"),
)

_CLIP_SIGNATURE = ("parameters", "max_norm", "total_norm", "use_decoupled_grad")
_RNG_FUNCTIONS = ("_get_cuda_rng_state", "_set_cuda_rng_state")
_TORCH_CUDA_PATCHED = ("current_device", "synchronize", "get_rng_state", "set_rng_state", "manual_seed")
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange",
              "zeros_like", "ones_like", "empty_like", "full_like")

# Originals of everything replaced, keyed by (owner id string, attribute); filled by apply.
_ORIGINALS: dict[tuple[str, str], Any] = {}
_applied = False


def _resolve(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _original(owner: str, attr: str, current: Any) -> Any:
    """What upstream defined, even after the shim replaced it."""
    return _ORIGINALS.get((owner, attr), current)


def _check_site(site: _Site) -> str | None:
    try:
        module = importlib.import_module(site.module)
    except ImportError as e:
        return f"[{site.shim}] module {site.module} cannot be imported: {e}"
    try:
        target = _resolve(module, site.attr)
    except AttributeError:
        return f"[{site.shim}] {site.module}.{site.attr} no longer exists"
    if "." not in site.attr:  # a module-level function we may have replaced: read upstream's
        target = _original(site.module, site.attr, target)
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError) as e:
        return f"[{site.shim}] cannot read the source of {site.module}.{site.attr}: {e}"
    if site.needle not in source:
        return (f"[{site.shim}] {site.module}.{site.attr} no longer contains {site.needle!r}; "
                "the shim may be obsolete or wrong, re-check it against the new source")
    return None


def _check_patch_targets() -> list[str]:
    """The objects we replace exist and have the call shapes our replacements implement."""
    problems = []
    for name in _TORCH_CUDA_PATCHED:
        if not callable(getattr(torch.cuda, name, None)):
            problems.append(f"[torch] torch.cuda.{name} is missing")
    if not callable(getattr(torch.Tensor, "cuda", None)):
        problems.append("[S2 CUDASTR] torch.Tensor.cuda is missing")
    for site in _CUDA_STRING_SITES:
        module_torch = getattr(importlib.import_module(site.module), "torch", None)
        if module_torch is not torch and not isinstance(module_torch, _CpuTorch):
            problems.append(f"[S2 CUDASTR] {site.module} no longer refers to the global name `torch`")
    from megatron.core.optimizer import clip_grads, optimizer
    for mod in (clip_grads, optimizer):
        fn = _original(mod.__name__, "clip_grad_by_total_norm_fp32",
                       getattr(mod, "clip_grad_by_total_norm_fp32", None))
        if fn is None:
            problems.append(f"[S5 CLIPGRAD] {mod.__name__}.clip_grad_by_total_norm_fp32 no longer exists")
            continue
        params = tuple(inspect.signature(fn).parameters)
        if params != _CLIP_SIGNATURE:
            problems.append(f"[S5 CLIPGRAD] {mod.__name__}.clip_grad_by_total_norm_fp32 parameters are "
                            f"{params}, expected {_CLIP_SIGNATURE}")
    from megatron.core.tensor_parallel import random as mc_random
    for name in _RNG_FUNCTIONS:
        if not callable(getattr(mc_random, name, None)):
            problems.append(f"[S7 CPURNG] megatron.core.tensor_parallel.random.{name} no longer exists")
    return problems


def check_upstream() -> None:
    """Raise `UpstreamChanged` listing every patched symbol that changed shape upstream."""
    import megatron.core

    problems = [p for s in _CUDA_STRING_SITES + _OTHER_SITES if (p := _check_site(s))]
    problems += _check_patch_targets()
    if problems:
        version = getattr(megatron.core, "__version__", "?")
        raise UpstreamChanged(
            f"miles.trainer.cpu_compat was written for megatron-core 0.16.1; the installed {version} "
            "differs where the CPU shims rely on it:\n  " + "\n  ".join(problems))


class _CpuTorch:
    """Stands in for `torch` inside selected megatron modules: factories asked for CUDA use the CPU."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._wrapped = {name: _cpu_factory(getattr(real, name)) for name in _FACTORIES}

    def __getattr__(self, name: str) -> Any:
        wrapped = self._wrapped.get(name)
        return wrapped if wrapped is not None else getattr(self._real, name)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _cpu_factory(fn: Callable) -> Callable:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    factory.__doc__ = f"{fn.__name__} with CUDA devices mapped to the CPU (miles cpu_compat S2)."
    return factory


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """S5: megatron's clip_grad_by_total_norm_fp32 without the CUDA tensor-type assert."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            assert grad.dtype in (torch.float32, torch.bfloat16), grad.dtype
            to_local_if_dtensor(grad).detach().mul_(clip_coeff)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _replace(owner: Any, attr: str, value: Any) -> None:
    key = (getattr(owner, "__name__", repr(owner)), attr)
    _ORIGINALS.setdefault(key, getattr(owner, attr, None))
    setattr(owner, attr, value)


def _cuda_type_string(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """S9: `Tensor.type()` with no target reports a CPU tensor as `torch.cuda.<T>Tensor`."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return "torch.cuda." + torch._C.TensorBase.type(self).rsplit(".", 1)[-1]
    return torch._C.TensorBase.type(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def cuda_type_strings() -> Iterator[None]:
    """S9: inside this block CPU tensors claim CUDA type strings (wrap `get_megatron_optimizer`).

    Only for CPU-only runs with the bf16 or distributed optimizer; restores `Tensor.type` on exit.
    """
    if torch.cuda.is_available():
        raise RuntimeError("cuda_type_strings() is for CPU-only runs; CUDA is available here")
    if "type" in torch.Tensor.__dict__:
        raise UpstreamChanged("[S9 CUDATYPE] torch.Tensor defines its own `type`; the shim would shadow it")
    torch.Tensor.type = _cuda_type_string
    try:
        yield
    finally:
        del torch.Tensor.type


def apply_cpu_compat() -> None:
    """Install shims S1-S5 and S7 (idempotent). Call only when CUDA is unavailable."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_compat() is for CPU-only runs; CUDA is available here")
    check_upstream()
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils

    _replace(torch.cuda, "current_device", lambda: torch.device("cpu"))  # S1
    proxy = _CpuTorch(torch)  # S2
    for site in _CUDA_STRING_SITES:
        _replace(importlib.import_module(site.module), "torch", proxy)
    _replace(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    _replace(torch.cuda, "synchronize", lambda device=None: None)  # S3
    if not hasattr(moe_utils, "te_general_gemm"):  # S4
        _replace(moe_utils, "te_general_gemm", None)
    for mod in (clip_grads, optimizer):  # S5
        _replace(mod, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
    _replace(mc_random, "_get_cuda_rng_state", _cpu_get_rng_state)  # S7
    _replace(mc_random, "_set_cuda_rng_state", _cpu_set_rng_state)
    _replace(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _replace(torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    _replace(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
    _applied = True
    logger.info("megatron-core CPU shims applied (S1 S2 S3 S4 S5 S7)")


def is_applied() -> bool:
    """Whether `apply_cpu_compat()` has run in this process."""
    return _applied
