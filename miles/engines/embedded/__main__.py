"""`python -m miles.engines.embedded` / `miles-engine`: serve one checkpoint with SGLang's HTTP API.

    python -m miles.engines.embedded --model-path DIR --host 127.0.0.1 --port 30000 \\
        [--dtype float32|bfloat16|float16] [--max-batch-size 64] [--random-seed 0] \\
        [--weight-version default] [--num-threads 0] [--log-level info] [--enable-return-routed-experts]
        [--router-selection-noise SCALE]

The port is bound first and /health answers 503 until the model is loaded, then 200.
SIGTERM or SIGINT stops the server; the exit code is 1 if the model could not be loaded.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from miles.engines.embedded.server import EngineArgs, EngineState, build_app

logger = logging.getLogger("miles.engines.embedded")


def parse_args(argv: list[str] | None = None) -> EngineArgs:
    ap = argparse.ArgumentParser(prog="miles-engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", required=True, help="Hugging Face checkpoint folder (local)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--random-seed", type=int, default=0)
    ap.add_argument("--weight-version", default="default")
    ap.add_argument("--num-threads", type=int, default=0,
                    help="torch intra-op threads (0 = one per core); use fewer when cores are shared")
    ap.add_argument("--enable-return-routed-experts", action="store_true",
                    help="capture each token's top-k experts (MoE only); requests ask with return_routed_experts")
    ap.add_argument("--router-selection-noise", type=float, default=0.0, metavar="SCALE",
                    help="study knob (MoE): perturb each router's top-k choice by SCALE x std(router weight), "
                         "gating weights unchanged, so engine and trainer routing diverge (docs/r3.md)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = ap.parse_args(argv)
    if a.max_batch_size < 1:
        ap.error("--max-batch-size must be >= 1")
    if a.num_threads < 0:
        ap.error("--num-threads must be >= 0")
    logging.basicConfig(
        level=a.log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s [engine:{a.port}] %(levelname)s %(name)s: %(message)s",
    )
    return EngineArgs(
        model_path=a.model_path, host=a.host, port=a.port, dtype=a.dtype, max_batch_size=a.max_batch_size,
        random_seed=a.random_seed, weight_version=a.weight_version, num_threads=a.num_threads,
        enable_return_routed_experts=a.enable_return_routed_experts,
        router_selection_noise=a.router_selection_noise,
    )


async def serve(args: EngineArgs) -> int:
    """Bind, load the model on the worker thread, serve until a signal; return the exit code."""
    state = EngineState(args)
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    logger.info("listening on http://%s:%d; loading %s", args.host, args.port, args.model_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state.scheduler.start()
    while not (state.ready or state.scheduler.load_error is not None or stop.is_set()):
        await asyncio.sleep(0.05)
    code = 1 if state.scheduler.load_error is not None else 0
    if state.ready:
        logger.info("ready: model loaded, serving")
        await stop.wait()
    logger.info("shutting down")
    state.scheduler.stop()
    await runner.cleanup()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
