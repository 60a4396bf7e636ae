#!/usr/bin/env python3
"""P3: rollout tokens/s through Miles (RolloutClient -> our router -> SGLang) vs direct /generate.

    python tools/gpu/bench_rollout.py --out FILE --log-dir DIR [--gpu 1] [--requests 128] [--group-size 8]
        [--new-tokens 128] [--prompt-len 64] [--rounds 3] [--start-timeout 300] [--model-path DIR] [--embedded]

One engine (real SGLang on --gpu with the adapter's verified flags, miles.engines.sglang; with
--embedded the CPU embedded engine, for dry runs) serves a model (default: the tiny Qwen3 of
tools/make_tiny_model.py --hidden 256, built into a temp dir); our router (miles.engines.router)
fronts it. The workload is --requests concurrent requests (--requests / --group-size prompts of
--prompt-len random tokens, --group-size samples each), each exactly --new-tokens long
(ignore_eos), temperature 1, seeded, with logprobs. Every path sends the very same bodies:

- direct:          aiohttp -> EngineClient.generate -> engine                  (the baseline)
- router:          aiohttp -> EngineClient.generate -> our router -> engine    (router hop only)
- rollout_client:  RolloutClient.generate -> our router -> engine              (what a Miles run does:
                   + Sample bookkeeping, detokenisation, a zero reward, the semaphore)

After one warm-up burst, --rounds rounds run the three paths in turn; reported: generated tokens /
wall seconds of each burst, the median per path, and each path's ratio to direct. A tiny model
makes the engine fast, so the ratio shows the client/router overhead at its most visible.

SGLang that is not importable (PYTHONPATH) makes the part "skipped" with the reason. SIGTERM
stops the servers (they run in sessions of their own); their PIDs are also written to
--pid-file so the caller can stop them if this process is killed.
"""

import argparse
import asyncio
import importlib.util
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_common import REPO, free_port, write_json  # noqa: E402


def zero_reward(_inp) -> float:
    return 0.0


def fixed_length_client(router_url: str, args, tokenizer):
    """A RolloutClient whose requests also carry ignore_eos (every response exactly --new-tokens long)."""
    from miles.rollout.client import RolloutClient
    from miles.rollout.config import RolloutConfig

    class FixedLengthRolloutClient(RolloutClient):
        def payload(self, sample):
            body = super().payload(sample)
            body["sampling_params"]["ignore_eos"] = True
            return body

    cfg = RolloutConfig(n_samples_per_prompt=args.group_size, max_new_tokens=args.new_tokens, temperature=1.0,
                        concurrency=args.requests, request_retries=0)
    return FixedLengthRolloutClient(router_url, cfg, zero_reward, tokenizer, eos_token_ids=[], seed=0,
                                    request_timeout_s=600.0)


def prompts(args):
    from miles.rollout.data_source import PromptItem

    rng = random.Random(0)
    return [PromptItem(group_id=g, prompt="", prompt_tokens=[rng.randrange(3, 500) for _ in range(args.prompt_len)])
            for g in range(args.requests // args.group_size)]


async def raw_burst(url: str, bodies: list[dict]) -> tuple[float, int]:
    """All bodies at once through EngineClient on one aiohttp session; (seconds, generated tokens)."""
    import aiohttp

    from miles.engines.client import EngineClient

    connector = aiohttp.TCPConnector(limit=len(bodies))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), connector=connector) as session:
        client = EngineClient(url, session=session)
        began = time.perf_counter()
        outs = await asyncio.gather(*(client.generate(b) for b in bodies))
        seconds = time.perf_counter() - began
    return seconds, sum(len(o["output_ids"]) for o in outs)


def client_burst(client, items) -> tuple[float, int]:
    began = time.perf_counter()
    batch = client.generate_sync(items)
    seconds = time.perf_counter() - began
    return seconds, sum(len(s.response_tokens) for s in batch.samples)


def start_engine(args, model_path: Path, log_dir: Path):
    from miles.engines.config import EngineConfig
    from miles.engines.process import launch_embedded_engine
    from miles.engines.sglang import SGLangConfig, launch_sglang_engine

    port = free_port()
    if args.embedded:
        return launch_embedded_engine(model_path, "127.0.0.1", port, log_dir / "p3-engine.log",
                                      extra_args=("--dtype", "bfloat16", "--num-threads", "1",
                                                  "--max-batch-size", str(args.requests)))
    sglang = SGLangConfig(first_gpu=args.gpu, mem_fraction_static=args.mem_fraction, on_version_mismatch="warn")
    return launch_sglang_engine(model_path, EngineConfig(kind="sglang", dtype="bfloat16", host="127.0.0.1"), sglang,
                                port, gpu_id=args.gpu, seed=0, log_path=log_dir / "p3-sglang.log")


def run(args, report: dict, tmp: Path) -> None:
    from transformers import AutoTokenizer

    from miles.engines.process import launch_router
    from miles.engines.sglang import SGLangServer

    model_path = args.model_path
    if model_path is None:
        model_path = tmp / "qwen3-tiny"
        subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(model_path), "--hidden", "256"],
                       check=True, capture_output=True)
    report["model_path"] = str(model_path)
    servers = []
    try:
        began = time.perf_counter()
        engine = start_engine(args, Path(model_path), args.log_dir)
        servers.append(engine)
        args.pid_file.write_text(f"{engine.pid}\n")
        if isinstance(engine, SGLangServer):
            info = engine.wait_ready(args.start_timeout)
            report["engine"] = f"sglang {info.version}"
        else:
            engine.wait_healthy(args.start_timeout, path="/health_generate")
            report["engine"] = "embedded (dry run)"
        report["engine_start_seconds"] = time.perf_counter() - began
        router = launch_router("127.0.0.1", free_port(), [engine.url], args.log_dir / "p3-router.log")
        servers.append(router)
        args.pid_file.write_text(f"{engine.pid}\n{router.pid}\n")
        router.wait_healthy(30.0, path="/readiness")
        print(f"P3 engine ({report['engine']}) ready in {report['engine_start_seconds']:.0f} s", flush=True)

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        client = fixed_length_client(router.url, args, tokenizer)
        items = prompts(args)
        from miles.rollout.sample import Sample

        bodies = [client.payload(Sample(group_id=p.group_id, index=i, prompt_tokens=list(p.prompt_tokens)))
                  for p in items for i in range(args.group_size)]
        paths = {"direct": lambda: asyncio.run(raw_burst(engine.url, bodies)),
                 "router": lambda: asyncio.run(raw_burst(router.url, bodies)),
                 "rollout_client": lambda: client_burst(client, items)}
        paths["direct"]()  # warm-up (kernels, caches)
        rounds: dict[str, list[dict]] = {k: [] for k in paths}
        for r in range(args.rounds):
            for name, burst in paths.items():
                seconds, tokens = burst()
                if tokens != args.requests * args.new_tokens:
                    raise RuntimeError(f"{name}: {tokens} tokens generated, expected {args.requests} x "
                                       f"{args.new_tokens} (ignore_eos)")
                rounds[name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
                print(f"P3 round {r} {name}: {tokens / seconds:.0f} tok/s", flush=True)
            report["paths"] = {k: {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in v), "rounds": v}
                               for k, v in rounds.items() if v}
            write_json(args.out, report)
        direct = report["paths"]["direct"]["tokens_per_s"]
        for v in report["paths"].values():
            v["ratio_to_direct"] = v["tokens_per_s"] / direct
    finally:
        for server in reversed(servers):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--log-dir", required=True, type=Path)
    ap.add_argument("--pid-file", type=Path, help="default: OUT with .pids")
    ap.add_argument("--gpu", type=int, default=1)
    ap.add_argument("--mem-fraction", type=float, default=0.3)
    ap.add_argument("--model-path", type=Path)
    ap.add_argument("--embedded", action="store_true", help="the CPU embedded engine instead of SGLang (dry run)")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    if args.requests % args.group_size:
        ap.error("--requests must be a multiple of --group-size")
    args.pid_file = args.pid_file or args.out.with_suffix(".pids")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    report = {"requests": args.requests, "group_size": args.group_size, "new_tokens": args.new_tokens,
              "prompt_len": args.prompt_len, "rounds": args.rounds, "concurrency": args.requests,
              "gpu": None if args.embedded else args.gpu}
    if not args.embedded and importlib.util.find_spec("sglang") is None:
        report.update(status="skipped", reason="sglang is not importable (install the wheelhouse; PYTHONPATH=/tmp/site)")
        write_json(args.out, report)
        print(f"P3 skipped: {report['reason']}", flush=True)
        return 0
    # The caller stops this process with SIGTERM at its deadline: unwind, so `finally` stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        run(args, report, Path(tmp))
    report["status"] = "ok"
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
