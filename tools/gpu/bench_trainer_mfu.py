#!/usr/bin/env python3
"""P1: trainer MFU, one rank of Megatron GPTModel forward + backward in bf16 at TP = WORLD_SIZE.

    RANK=r WORLD_SIZE=N LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tools/gpu/bench_trainer_mfu.py --out FILE [--models qwen3-1.7b:2,qwen3-8b:1] [--seq 4096]
        [--warmup 2] [--iters 5]

Each model NAME:MICRO_BATCH (shapes in bench_shapes.py) is built with
miles.trainer.model_provider.build_gpt_model (local spec, SDPA attention, bf16 params, random
N(0, 0.02) weights made on the GPU), then timed on random tokens: zero grads, forward with labels
(megatron's vocab-parallel cross entropy), mean loss, backward. No optimizer step: an 8B model
with Adam's fp32 state does not fit one 80 GB GPU, so every configuration is measured the same
way, fwd + bwd only (the optimizer step is memory-bound and small next to it).

Timing: `--warmup` untimed iterations, then `--iters` iterations timed with CUDA events (wall
clock on the CPU); with TP > 1 the slowest rank's mean counts. Reported per model: iteration ms,
tokens/s, model TFLOP/s per GPU and MFU = FLOPs per iteration / (iteration time x GPUs x peak),
FLOPs per token = 6 N_matmul + 12 L H D S (bench_shapes.py), peak = the GPU's datasheet dense bf16
(989.4 TFLOP/s for H100 SXM and H200). On CUDA OOM at TP = 1 the model is retried once with half
the micro-batch (or half the sequence), and the JSON says so. Rank 0 rewrites --out after each model.
"""

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_common import write_json  # noqa: E402
from bench_shapes import SHAPES, Qwen3Shape, peak_bf16_flops  # noqa: E402


def build_model(shape: Qwen3Shape, seq_len: int, tp_size: int):
    """bf16 GPTModel of `shape` with random weights (made on the GPU: CPU init of 8B weights takes minutes)."""
    from miles.trainer.model_provider import build_gpt_model

    on_gpu = torch.cuda.is_available()
    model = build_gpt_model(shape.hf_config(max(seq_len, 4096)), tp_size=tp_size, params_dtype=torch.bfloat16,
                            init_weights=not on_gpu, use_cpu_initialization=not on_gpu)
    if on_gpu:
        gen = torch.Generator(device=f"cuda:{torch.cuda.current_device()}").manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
    return model


def time_iterations(model, vocab: int, micro_batch: int, seq_len: int, device: torch.device, warmup: int,
                    iters: int) -> list[float]:
    """Seconds of each timed fwd+bwd iteration (same random tokens on every TP rank)."""
    gen = torch.Generator(device=device).manual_seed(1)
    ids_BS = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device, generator=gen)
    input_ids_BS, labels_BS = ids_BS[:, :-1].contiguous(), ids_BS[:, 1:].contiguous()
    position_ids_BS = torch.arange(seq_len, device=device).expand(micro_batch, seq_len).contiguous()
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        loss_BS = model(input_ids_BS, position_ids_BS, None, labels=labels_BS)
        loss_BS.float().mean().backward()

    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            step()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - began)
    for p in params:
        p.grad = None
    return seconds


def measure(name: str, micro_batch: int, seq_len: int, state, warmup: int, iters: int, peak: float | None) -> dict:
    """Numbers of one model at this TP size (see the module docstring)."""
    import torch.distributed as dist

    shape = SHAPES[name]
    began = time.perf_counter()
    model = build_model(shape, seq_len, state.tp_size)
    build_s = time.perf_counter() - began
    if state.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(state.device)
    try:
        seconds = time_iterations(model, shape.vocab, micro_batch, seq_len, state.device, warmup, iters)
    finally:
        del model
        gc.collect()
        if state.device.type == "cuda":
            torch.cuda.empty_cache()
    mean_s = sum(seconds) / len(seconds)
    slowest = torch.tensor([mean_s], dtype=torch.float64, device=state.device)
    if state.tp_size > 1:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    iter_s = slowest.item()
    tokens = micro_batch * seq_len
    flops = shape.train_flops_per_token(seq_len) * tokens
    per_gpu = flops / iter_s / state.tp_size
    out = {
        "model": name, "total_params": shape.total_params, "matmul_params": shape.matmul_params,
        "tp_size": state.tp_size, "num_gpus": state.tp_size, "seq_len": seq_len, "micro_batch": micro_batch,
        "tokens_per_iter": tokens, "warmup": warmup, "iters": iters, "build_seconds": round(build_s, 1),
        "iter_ms": iter_s * 1e3, "iter_ms_min": min(seconds) * 1e3, "iter_ms_this_rank": [s * 1e3 for s in seconds],
        "tokens_per_s": tokens / iter_s, "flops_per_token": shape.train_flops_per_token(seq_len),
        "tflops_per_gpu": per_gpu / 1e12, "mfu": None if peak is None else per_gpu / peak,
    }
    if state.device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(state.device) / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", default="qwen3-1.7b:2,qwen3-8b:1", help="NAME:MICRO_BATCH,... (bench_shapes.SHAPES)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    models = [(m.split(":")[0], int(m.split(":")[1]) if ":" in m else 1) for m in args.models.split(",")]
    unknown = [m for m, _ in models if m not in SHAPES]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {sorted(SHAPES)}")

    from miles.trainer import cpu_compat
    from miles.trainer.parallel import init_parallel, teardown_parallel

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if not torch.cuda.is_available():
        cpu_compat.apply_cpu_compat()
    os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
    state = init_parallel(tp_size=int(os.environ["WORLD_SIZE"]), timeout_s=300)
    name = torch.cuda.get_device_name(state.device) if state.device.type == "cuda" else "cpu"
    peak = peak_bf16_flops(name)
    report = {"device_name": name, "peak_bf16_flops": peak, "tp_size": state.tp_size, "torch": torch.__version__,
              "models": {}}
    try:
        for model, micro_batch in models:
            seq_len = args.seq
            for attempt in range(2):
                try:
                    result = measure(model, micro_batch, seq_len, state, args.warmup, args.iters, peak)
                    if attempt:
                        result["note"] = "OOM at the first size; this is the retry at half the tokens"
                    break
                except torch.cuda.OutOfMemoryError as exc:
                    result = {"model": model, "error": f"CUDA OOM at micro_batch {micro_batch} seq {seq_len}: "
                                                       f"{str(exc).splitlines()[0]}"}
                    gc.collect()
                    torch.cuda.empty_cache()
                    if state.tp_size > 1 or attempt:  # a retry on one TP rank only would desynchronise the ranks
                        break
                    micro_batch, seq_len = (micro_batch // 2, seq_len) if micro_batch > 1 else (1, seq_len // 2)
            report["models"][model] = result
            if state.rank == 0:
                write_json(args.out, report)
                mfu = result.get("mfu")
                print(f"P1 TP={state.tp_size} {model}: " + (result["error"] if "error" in result else
                      f"{result['iter_ms']:.1f} ms/iter, {result['tokens_per_s']:.0f} tok/s, "
                      f"{result['tflops_per_gpu']:.1f} TFLOP/s/GPU, MFU "
                      f"{'n/a' if mfu is None or math.isnan(mfu) else f'{mfu:.3f}'}"), flush=True)
    finally:
        teardown_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
