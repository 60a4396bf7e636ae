#!/usr/bin/env python3
"""P4: peak memory and time of log-prob + entropy from hidden states and the LM head, three ways.

    python tools/gpu/bench_kernel.py --out bench-results/kernel.json [--cases big,small] [--iters 5] [--dry-run]

For each case (an LM head of shape N tokens x H hidden x V vocab, bf16, temperature 1), runs forward
+ backward (d hidden and d weight, upstream gradients on both outputs) of
- naive:     logits = hidden @ weight^T in bf16 -> .float() / T -> log_softmax gather + entropy
             (what miles/trainer/logprobs.py does today),
- reference: miles.kernels logprob_entropy_reference (chunked torch, recomputing backward),
- triton:    miles.kernels logprob_entropy_triton (fused forward, recompute + cuBLAS backward),
side by side in one process, and reports per variant: peak extra memory (torch.cuda.max_memory_allocated
after a reset, minus what the inputs already held), the median time of --iters timed runs (CUDA
events, after one warm-up run that also compiles Triton), and max |logprob|, |entropy| difference
from naive. Acceptance target (per case): triton peak <= naive peak / 2 at triton time <= naive time.

Unattended use (tools/gpu/bench_gpu.py runs it as P4 with a 60 s limit): a failing variant (OOM,
compile error) records its error text and the run goes on; --budget-s (default 45) stops starting
new variants once spent; --out is rewritten after every variant, so a run stopped from outside
keeps what it measured. Prints a table at the end. Needs CUDA; --dry-run (= --cases tiny on the
CPU: timings only, no memory numbers, the Triton variant records its error unless
TRITON_INTERPRET=1) checks the script itself.
"""

import argparse
import datetime
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CASES = {
    "big": dict(num_tokens=8192, hidden=4096, vocab=151936),    # Qwen-7B-class head, 8k tokens
    "small": dict(num_tokens=4096, hidden=2048, vocab=151936),  # Qwen3-1.7B-class head, 4k tokens
    "tiny": dict(num_tokens=300, hidden=64, vocab=1000),        # script check (CPU or GPU)
}
VARIANTS = ("naive", "triton", "reference")
TEMPERATURE = 1.0


def import_kernels():
    """miles.kernels.logprob_entropy; without an editable install, map kernels/ into miles by hand."""
    sys.path.insert(0, str(REPO))
    try:
        import miles.kernels.logprob_entropy as module
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location("miles.kernels", REPO / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "kernels")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["miles.kernels"] = package
        spec.loader.exec_module(package)
        import miles.kernels.logprob_entropy as module
    return module


def naive(hidden_NH, weight_VH, targets_N, temperature):
    logp_NV = torch.log_softmax((hidden_NH @ weight_VH.T).float() / temperature, dim=-1)
    return logp_NV.gather(1, targets_N[:, None]).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)


def make_inputs(device, num_tokens, hidden, vocab, dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden_NH = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype).requires_grad_()
    weight_VH = torch.randn(vocab, hidden, generator=gen, device=device) * 3 / hidden ** 0.5
    weight_VH = weight_VH.to(dtype).requires_grad_()
    targets_N = torch.randint(0, vocab, (num_tokens,), generator=gen, device=device)
    g_lp_N = torch.randn(num_tokens, generator=gen, device=device)
    g_ent_N = torch.randn(num_tokens, generator=gen, device=device)
    return hidden_NH, weight_VH, targets_N, g_lp_N, g_ent_N


def step(fn, inputs):
    """One forward + backward; returns (logprob, entropy) detached (the gradients are dropped)."""
    hidden_NH, weight_VH, targets_N, g_lp_N, g_ent_N = inputs
    lp_N, ent_N = fn(hidden_NH, weight_VH, targets_N, TEMPERATURE)
    torch.autograd.grad((lp_N * g_lp_N + ent_N * g_ent_N).sum(), (hidden_NH, weight_VH))
    return lp_N.detach(), ent_N.detach()


def clear(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(fn, inputs, device, iters: int) -> tuple[dict, tuple]:
    """Warm-up (timed separately: includes Triton compilation), peak memory of one run, `iters` timed runs."""
    on_cuda = device.type == "cuda"
    clear(device)
    began = time.perf_counter()
    step(fn, inputs)
    clear(device)
    warmup_s = time.perf_counter() - began
    peak_gib = None
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        out = step(fn, inputs)
        torch.cuda.synchronize()
        peak_gib = (torch.cuda.max_memory_allocated() - held) / 2**30
    times_ms = []
    for _ in range(iters):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step(fn, inputs)
            end.record()
            torch.cuda.synchronize()
            times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = step(fn, inputs)
            times_ms.append((time.perf_counter() - t0) * 1e3)
    result = {"peak_extra_gib": peak_gib, "median_ms": statistics.median(times_ms),
              "times_ms": [round(t, 3) for t in times_ms], "warmup_s": round(warmup_s, 2)}
    return result, out


def run_case(case: dict, kernels, device, iters, deadline, save) -> dict:
    """Fill case["variants"] (and case["acceptance"]), calling save() after every variant."""
    fns = {"naive": naive, "reference": kernels.logprob_entropy_reference, "triton": kernels.logprob_entropy_triton}
    shape = {k: case[k] for k in ("num_tokens", "hidden", "vocab")}
    try:
        inputs = make_inputs(device, **shape)
    except Exception as exc:  # noqa: BLE001 -- process boundary of the case: record it and go on
        case["error"] = f"inputs: {type(exc).__name__}: {exc}"
        save()
        return case
    naive_out = None
    for variant in VARIANTS:
        if time.monotonic() > deadline:
            case["variants"][variant] = {"error": "skipped: --budget-s spent"}
            continue
        try:
            result, out = measure(fns[variant], inputs, device, iters if variant != "reference" else min(iters, 2))
            if variant == "naive":
                naive_out = out
            elif naive_out is not None:
                result["logprob_max_diff_vs_naive"] = (out[0] - naive_out[0]).abs().max().item()
                result["entropy_max_diff_vs_naive"] = (out[1] - naive_out[1]).abs().max().item()
            case["variants"][variant] = result
        except Exception as exc:  # noqa: BLE001 -- one variant's failure (OOM, compile) must not end the run
            case["variants"][variant] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                         "traceback": traceback.format_exc()[-3000:]}
        finally:
            clear(device)
            save()
    case["acceptance"] = acceptance(case["variants"])
    save()
    del inputs
    clear(device)
    return case


def acceptance(variants: dict) -> dict:
    nv, tr = variants.get("naive", {}), variants.get("triton", {})
    if "median_ms" not in nv or "median_ms" not in tr or nv.get("peak_extra_gib") is None:
        return {"evaluated": False, "reason": "naive or triton did not run on CUDA"}
    memory_ratio = nv["peak_extra_gib"] / max(tr["peak_extra_gib"], 1e-9)
    time_ratio = tr["median_ms"] / nv["median_ms"]
    return {"evaluated": True, "memory_ratio_naive_over_triton": round(memory_ratio, 2),
            "time_ratio_triton_over_naive": round(time_ratio, 3), "memory_2x_lower": memory_ratio >= 2.0,
            "time_not_worse": time_ratio <= 1.0, "passed": memory_ratio >= 2.0 and time_ratio <= 1.0}


def print_table(cases: list[dict]) -> None:
    print(f"{'case':6s} {'variant':10s} {'peak GiB':>9s} {'median ms':>10s} {'warmup s':>9s} "
          f"{'|dlp| vs naive':>15s}  note")
    for case in cases:
        for variant, r in case["variants"].items():
            peak = "-" if r.get("peak_extra_gib") is None else f"{r['peak_extra_gib']:.3f}"
            ms = f"{r['median_ms']:.2f}" if "median_ms" in r else "-"
            warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else "-"
            diff = f"{r['logprob_max_diff_vs_naive']:.2e}" if "logprob_max_diff_vs_naive" in r else "-"
            note = r.get("error", "")[:80]
            print(f"{case['case']:6s} {variant:10s} {peak:>9s} {ms:>10s} {warm:>9s} {diff:>15s}  {note}")
        print(f"{case['case']:6s} acceptance {json.dumps(case.get('acceptance', case.get('error')))}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="big,small", help=f"comma-separated, from {sorted(CASES)}")
    ap.add_argument("--iters", type=int, default=5, help="timed runs per variant (reference: at most 2)")
    ap.add_argument("--budget-s", type=float, default=45.0, help="start no new variant after this many seconds")
    ap.add_argument("--out", type=Path, help="JSON results file (rewritten after every variant)")
    ap.add_argument("--dry-run", action="store_true", help="--cases tiny on the CPU: checks the script only")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.cases = "tiny"
    names = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
    if args.iters < 1:
        ap.error(f"--iters must be >= 1, got {args.iters}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.dry_run else torch.device("cpu")
    if device.type != "cuda" and names != ["tiny"]:
        ap.error("no CUDA device: only --cases tiny runs on the CPU")
    began = time.monotonic()
    kernels = import_kernels()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", None) or _triton_version(),
            "iters": args.iters}
    cases = [{"case": name, **CASES[name], "dtype": "bfloat16", "temperature": TEMPERATURE, "variants": {}}
             for name in names]

    def save() -> None:
        meta["total_s"] = round(time.monotonic() - began, 1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(json.dumps({"meta": meta, "cases": cases}, indent=2) + "\n")
            os.replace(tmp, args.out)

    for case in cases:
        run_case(case, kernels, device, args.iters, began + args.budget_s, save)
    print_table(cases)
    print(f"total {meta['total_s']} s on {meta['device']}")
    return 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
