#!/usr/bin/env python3
"""`make bench-gpu`: the GPU benchmarks P1-P3 side by side (and P4 when tools/gpu/bench_kernel.py exists).

    python tools/gpu/bench_gpu.py [--out DIR] [--budget 540] [--only p1,p2,p3,p4] [--site /tmp/site] [--dry-run]

Needs 2 CUDA GPUs (P1's TP=2 row and P2 need both; P3 runs SGLang on GPU 1), megatron-core and,
for P3, SGLang importable (the offline wheelhouse in --site, default /tmp/site, is put on
PYTHONPATH; docs/gpu.md). Parts, each in child processes with its own time budget, so that one
failing or hanging part does not lose the others:

- P1 trainer MFU (bench_trainer_mfu.py): Megatron GPTModel fwd+bwd, bf16, Qwen3-1.7B and -8B
  shapes, seq 4096, at TP=1 on GPU 0 and TP=2 on GPUs 0+1.
- P2 weight sync (bench_weight_sync.py): 3.44 GB of bf16 weights GPU 0 -> GPU 1 through
  DistributedWeightSender into an SGLang-like receiver vs raw NCCL broadcasts.
- P3 rollout (bench_rollout.py): tok/s of RolloutClient -> router -> SGLang vs direct /generate.
- P4 kernels: tools/gpu/bench_kernel.py (another benchmark's, run as it is), if that file exists.

Writes DIR/bench_gpu.json (all numbers, rewritten after every part) and DIR/bench_gpu.md (tables),
DIR/logs/ (every child's output) and DIR/work/ (each part's raw JSON). DIR is --out, else $OUT,
else bench-results/gpu. Progress lines carry timestamps. The default budget (540 s) keeps the whole
run under 9 minutes. Exit status: 0 when every selected part is "ok" or "skipped", 1 otherwise.

--dry-run: the same control flow on the CPU with tiny sizes (gloo for NCCL, the embedded engine
for SGLang), to check the script itself; its numbers mean nothing.
"""

import argparse
import datetime
import importlib.metadata
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REPO, describe_failure, free_port, log, python_cmd, rank_env, read_json, run_children, write_json  # noqa: E402
from bench_report import markdown_report  # noqa: E402

PARTS = ("p1", "p2", "p3", "p4")
BUDGETS_S = {"p1": (200, 0), "p2": (90, 40), "p3": (330, 150), "p4": (150, 0)}
"""part -> (most seconds it may take, seconds kept back for it while earlier parts run)."""


class Context:
    """What every part needs: sizes (real or dry run), GPUs, folders, the clock."""

    def __init__(self, args, num_gpus: int):
        self.dry_run, self.num_gpus, self.out = args.dry_run, num_gpus, args.out
        self.work, self.logs = args.out / "work", args.out / "logs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)


def setup_env(site: str | None) -> None:
    """Environment of every child: repo + wheelhouse site on PYTHONPATH, offline HF, NCCL cuMem off, CUDA_HOME."""
    paths = [str(REPO)] + ([site] if site and Path(site).is_dir() else [])
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    for path in reversed(paths[1:]):
        sys.path.insert(0, path)  # so that this process sees what the children see (versions, find_spec)
    os.environ.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", NCCL_CUMEM_ENABLE="0")  # cuMem: SGLang runs with it off
    if not os.environ.get("CUDA_HOME"):  # SGLang's JIT kernels need the toolkit root
        nvcc = shutil.which("nvcc")
        candidates = ["/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-13"]
        if nvcc:
            candidates.append(str(Path(nvcc).resolve().parents[1]))
        for c in candidates:
            if Path(c, "bin", "nvcc").exists():
                os.environ["CUDA_HOME"] = c
                os.environ["PATH"] = f"{c}/bin{os.pathsep}{os.environ.get('PATH', '')}"
                break


def environment(args, num_gpus: int) -> dict:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        smi = []
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        git = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "git": git, "command": " ".join(sys.argv), "dry_run": args.dry_run,
            "budget_s": args.budget, "num_gpus": num_gpus, "gpus": smi, "python": platform.python_version(),
            "versions": {p: version(p) for p in ("torch", "megatron-core", "transformers", "sglang", "triton")},
            "cuda_home": os.environ.get("CUDA_HOME")}


# -- the parts -----------------------------------------------------------------------------------
def run_p1(ctx: Context, timeout_s: float) -> dict:
    """Two jobs: TP=1 (1 rank, GPU 0), then TP=2 (2 ranks); each writes bench_trainer_mfu.py's JSON."""
    if ctx.dry_run:
        models, sizes = "tiny:2", ["--seq", "64", "--warmup", "1", "--iters", "2"]
    else:
        models, sizes = "qwen3-1.7b:2,qwen3-8b:1", ["--seq", "4096", "--warmup", "2", "--iters", "5"]
    worlds = [1, 2] if ctx.dry_run or ctx.num_gpus >= 2 else [1]
    part: dict = {"jobs": {}, "what": "Megatron GPTModel fwd+bwd, bf16, no optimizer step"}
    if 2 not in worlds:
        part["note"] = f"TP=2 not run: {ctx.num_gpus} GPU(s)"
    deadline = time.monotonic() + timeout_s
    for i, world in enumerate(worlds):
        left = deadline - time.monotonic()
        budget = left / (len(worlds) - i)  # TP=1 gets half, TP=2 what is left
        out, port = ctx.work / f"p1-tp{world}.json", free_port()
        log(f"P1 TP={world}: {world} rank(s), models {models}, budget {budget:.0f} s")
        children = [(f"p1-tp{world}-rank{r}",
                     python_cmd("bench_trainer_mfu.py", "--out", out, "--models", models, *sizes),
                     {**rank_env(r, world, port), "OMP_NUM_THREADS": "1" if ctx.dry_run else "4"})
                    for r in range(world)]
        failure = describe_failure(run_children(children, budget, ctx.logs))
        job = read_json(out) or {}
        if failure:
            job["error"] = failure
        part["jobs"][f"tp{world}"] = job
        for name, r in job.get("models", {}).items():
            log(f"P1 TP={world} {name}: " + (r["error"] if "error" in r else
                f"{r['tokens_per_s']:.0f} tok/s, {r['tflops_per_gpu']:.1f} TFLOP/s/GPU, MFU {r['mfu']}"))
        if failure:
            log(f"P1 TP={world} failed: {failure.splitlines()[0]}")
    bad = [j for j in part["jobs"].values() if j.get("error") or any("error" in m for m in j.get("models", {}).values())]
    good = [m for j in part["jobs"].values() for m in j.get("models", {}).values() if "error" not in m]
    part["status"] = "ok" if not bad else ("partial" if good else "failed")
    return part


def run_p2(ctx: Context, timeout_s: float) -> dict:
    """Receiver (service) on GPU 1 and sender on GPU 0; the sender writes bench_weight_sync.py's JSON."""
    if not ctx.dry_run and ctx.num_gpus < 2:
        return {"status": "skipped", "reason": f"needs 2 GPUs, found {ctx.num_gpus}"}
    model, devices = ("small", ("cpu", "cpu")) if ctx.dry_run else ("qwen3-1.7b", ("cuda:0", "cuda:1"))
    out, port = ctx.work / "p2.json", free_port()
    log(f"P2: {model} shape, sender {devices[0]} -> receiver {devices[1]}, budget {timeout_s:.0f} s")
    children = [("p2-receiver", python_cmd("bench_weight_sync.py", "receiver", "--port", port, "--device", devices[1],
                                           "--model", model), {}),
                ("p2-sender", python_cmd("bench_weight_sync.py", "sender", "--engine-url", f"http://127.0.0.1:{port}",
                                         "--device", devices[0], "--receiver-device", devices[1], "--model", model,
                                         "--out", out), {})]
    failure = describe_failure(run_children(children, timeout_s, ctx.logs, services=("p2-receiver",)))
    part = read_json(out) or {}
    for key in ("miles", "miles_flattened_bucket", "raw_per_tensor", "raw_flat"):
        if key in part:
            log(f"P2 {key}: {part[key]['gb_per_s']:.2f} GB/s")
    if failure:
        part["error"] = failure
        log(f"P2 failed: {failure.splitlines()[0]}")
    part["status"] = "failed" if failure else "ok"
    return part


def _stop_leftover_servers(pid_file: Path) -> None:
    """Servers P3 started run in sessions of their own: if P3 was killed before it stopped them, do it here
    (by the PIDs it recorded, and only if they still run a server of ours)."""
    try:
        pids = [int(x) for x in pid_file.read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "sglang" in cmdline or "miles.engines" in cmdline:
            log(f"P3: stopping leftover server group {pid}")
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_p3(ctx: Context, timeout_s: float) -> dict:
    """bench_rollout.py in one child (it starts and stops the engine and the router)."""
    if not ctx.dry_run and ctx.num_gpus < 1:
        return {"status": "skipped", "reason": "no CUDA GPU"}
    out, pid_file = ctx.work / "p3.json", ctx.work / "p3.pids"
    argv = python_cmd("bench_rollout.py", "--out", out, "--log-dir", ctx.logs, "--pid-file", pid_file,
                      "--start-timeout", max(30, int(timeout_s - 90)))
    if ctx.dry_run:
        argv += ["--embedded", "--requests", "8", "--group-size", "4", "--new-tokens", "8", "--prompt-len", "8",
                 "--rounds", "1"]
    else:
        argv += ["--gpu", str(1 if ctx.num_gpus >= 2 else 0)]
    log(f"P3: {'embedded engine' if ctx.dry_run else 'SGLang'}, budget {timeout_s:.0f} s")
    try:
        failure = describe_failure(run_children([("p3-rollout", argv, {})], timeout_s, ctx.logs, term_grace_s=45))
    finally:
        _stop_leftover_servers(pid_file)
    part = read_json(out) or {}
    for name, path in part.get("paths", {}).items():
        log(f"P3 {name}: {path['tokens_per_s']:.0f} tok/s")
    if failure:
        part["error"] = failure
        log(f"P3 failed: {failure.splitlines()[0]}")
    part["status"] = "failed" if failure else part.get("status", "failed")
    return part


def run_p4(ctx: Context, timeout_s: float) -> dict:
    """tools/gpu/bench_kernel.py --out FILE --budget-s B (--cases tiny for a dry run), if that script exists."""
    script = Path(__file__).with_name("bench_kernel.py")
    if not script.exists():
        return {"status": "skipped", "reason": f"{script.relative_to(REPO)} does not exist"}
    out = ctx.work / "p4.json"
    argv = python_cmd(script.name, "--out", out, "--budget-s", max(10, int(timeout_s - 40)),
                      *(["--cases", "tiny"] if ctx.dry_run else []))
    log(f"P4: {script.name}, budget {timeout_s:.0f} s")
    failure = describe_failure(run_children([("p4-kernel", argv, {})], timeout_s, ctx.logs))
    part = {"result": read_json(out)}
    if failure:
        part["error"] = failure
        log(f"P4 failed: {failure.splitlines()[0]}")
    part["status"] = "failed" if failure else "ok"
    return part


RUNNERS = {"p1": run_p1, "p2": run_p2, "p3": run_p3, "p4": run_p4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench-results" / "gpu"))
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all parts together")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run")
    ap.add_argument("--site", default="/tmp/site", help="offline wheelhouse site put on PYTHONPATH (if it exists)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the control flow only")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--only takes parts of {PARTS}, got {args.only!r}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: children are stopped in `finally`
    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    setup_env(args.site)
    import torch

    num_gpus = torch.cuda.device_count()
    if not args.dry_run and num_gpus == 0:
        print("bench_gpu: no CUDA GPU visible; run it on the GPU machine, or use --dry-run on a CPU", file=sys.stderr)
        return 2
    ctx = Context(args, num_gpus)
    report = {"meta": environment(args, num_gpus), "parts": {}}
    log(f"bench_gpu: {num_gpus} GPU(s), parts {parts}, budget {args.budget:.0f} s, out {args.out}"
        + (" (DRY RUN on CPU)" if args.dry_run else ""))
    for i, name in enumerate(parts):
        left = args.budget - (time.monotonic() - began)
        reserve = sum(BUDGETS_S[p][1] for p in parts[i + 1:])
        timeout_s = min(BUDGETS_S[name][0], left - reserve)
        part_began = time.monotonic()
        if timeout_s < 20:
            result = {"status": "skipped", "reason": f"time budget spent ({left:.0f} s left, {reserve} s kept for later parts)"}
        else:
            try:
                result = RUNNERS[name](ctx, timeout_s)
            except Exception as exc:  # one part's bug must not lose the other parts' numbers
                traceback.print_exc()
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.monotonic() - part_began, 1)
        report["parts"][name] = result
        log(f"{name.upper()} {result['status']} in {result['seconds']:.0f} s"
            + (f": {result['reason']}" if result.get("reason") else ""))
        write_json(args.out / "bench_gpu.json", report)
        (args.out / "bench_gpu.md").write_text(markdown_report(report))
    report["meta"]["seconds"] = round(time.monotonic() - began, 1)
    write_json(args.out / "bench_gpu.json", report)
    text = markdown_report(report)
    (args.out / "bench_gpu.md").write_text(text)
    print(text, flush=True)
    log(f"bench_gpu: done in {report['meta']['seconds']:.0f} s; {args.out / 'bench_gpu.json'}, {args.out / 'bench_gpu.md'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
