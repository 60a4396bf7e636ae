#!/usr/bin/env python3
"""Throughput of one embedded engine: 64 concurrent requests x 64 new tokens (ignore_eos, T=1.0, seeded).

    python tools/bench_engine.py [--model-path DIR | --url http://host:port] [--out FILE.json]
        [--requests 64] [--new-tokens 64] [--prompt-len 32] [--max-batch-size 64] [--num-threads 0] [--port P]

Without --url it starts `python -m miles.engines.embedded` on a free port (building the tiny
Qwen3 with tools/make_tiny_model.py into a temp dir when --model-path is not given), waits for
/health, runs one warm-up request, then times the concurrent burst and stops the engine.
Repeats the burst --rounds times (CPU time on shared machines is noisy) and reports the median
round. Writes JSON (tokens/s median and best, requests, new tokens, seconds, model params, torch
threads, date, hostname) to --out and prints one summary line.
"""

import argparse
import asyncio
import datetime
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from miles.engines.client import EngineClient  # noqa: E402
from miles.engines.process import launch_embedded_engine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def burst(url: str, num_requests: int, new_tokens: int, prompt_len: int) -> tuple[float, int]:
    """Send all requests at once; return (wall seconds, generated tokens)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(prompt_len)] for _ in range(num_requests)]
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        client = EngineClient(url, session=session)
        await client.generate({"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 4}})  # warm-up
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[
            client.generate({
                "input_ids": p,
                "sampling_params": {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True, "sampling_seed": i},
            })
            for i, p in enumerate(prompts)
        ])
        seconds = time.perf_counter() - t0
    return seconds, sum(o["meta_info"]["completion_tokens"] for o in outs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--url", help="benchmark a running engine instead of starting one")
    ap.add_argument("--out", help="write the JSON result here")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed bursts; the median is reported (CPU time is noisy)")
    ap.add_argument("--num-threads", type=int, default=0, help="engine --num-threads (0 = torch default)")
    ap.add_argument("--port", type=int, default=0, help="engine port (default: a free one)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        engine = None
        url = args.url
        if url is None:
            model_path = args.model_path
            if model_path is None:
                model_path = os.path.join(tmp, "qwen3-tiny")
                subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), model_path],
                               check=True, capture_output=True)
            engine = launch_embedded_engine(model_path, "127.0.0.1", args.port or free_port(), Path(tmp) / "engine.log",
                                            extra_args=["--max-batch-size", str(args.max_batch_size),
                                                        "--num-threads", str(args.num_threads)])
            url = engine.url
        try:
            if engine is not None:
                engine.wait_healthy(180)
            info = asyncio.run(_server_info(url))
            rounds = [asyncio.run(burst(url, args.requests, args.new_tokens, args.prompt_len)) for _ in range(args.rounds)]
        finally:
            if engine is not None:
                engine.stop()
    rates = sorted(tokens / seconds for seconds, tokens in rounds)
    seconds, tokens = sorted(rounds, key=lambda r: r[1] / r[0])[len(rounds) // 2]
    result = {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_best": rates[-1],
        "tokens_per_s_rounds": rates,
        "rounds": args.rounds,
        "requests": args.requests,
        "new_tokens": tokens,
        "seconds": seconds,
        "model_path": info.get("model_path"),
        "model_params": info.get("num_params"),
        "torch_threads": info.get("torch_num_threads"),
        "max_batch_size": info.get("max_batch_size"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"embedded engine: {tokens} tokens from {args.requests} requests in {seconds:.2f} s = "
          f"{result['tokens_per_s']:.0f} tok/s median of {args.rounds} (best {rates[-1]:.0f}; "
          f"{result['model_params']} params, {result['torch_threads']} torch threads)")
    return 0


async def _server_info(url: str) -> dict:
    async with EngineClient(url) as client:
        return await client.server_info()


if __name__ == "__main__":
    sys.exit(main())
