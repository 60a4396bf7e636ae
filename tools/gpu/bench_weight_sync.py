#!/usr/bin/env python3
"""P2: weight-sync GB/s, Miles' DistributedWeightSender vs a raw NCCL broadcast of the same bytes.

    python tools/gpu/bench_weight_sync.py receiver --port HTTP_PORT --device cuda:1 [--model qwen3-1.7b]
    python tools/gpu/bench_weight_sync.py sender --engine-url http://127.0.0.1:HTTP_PORT --device cuda:0
        --out FILE [--model qwen3-1.7b] [--repeats 3]

The payload is every weight of a Qwen3 checkpoint shape (bench_shapes.py; qwen3-1.7b: 311 tensors,
3.44 GB of bf16) with its HF names, random values.

The receiver stands in for SGLang's receiving side; real SGLang would need a real checkpoint of
that size loaded first, too slow for a bounded benchmark. It serves the three endpoints our
sender calls, with SGLang 0.5.17's semantics (ModelRunner.update_weights_from_distributed): join
the named group through init_custom_process_group (the same rendezvous SGLang uses); per update,
allocate each tensor, post async broadcasts from rank 0, wait for them, then copy every tensor
into the preallocated "model" by name (SGLang's load_weights, without the fused-QKV narrowing),
and synchronize the GPU before answering. What it does not have: SGLang's tokenizer-manager to
scheduler hop (ZMQ) per request, and its weight loaders' reshuffling.

Measured on the sender (GPU 0), after one untimed warm-up send (NCCL communicator set-up):
- miles: `DistributedWeightSender.send` (HTTP POST per 512 MB bucket, the default, + per-tensor broadcasts),
  the same at other bucket sizes (--bucket-sweep-mb), and
  the same with load_format="flattened_bucket" (one broadcast per bucket); GPU synchronized at the end;
- raw: the same tensors broadcast one by one between the same two GPUs (a second group, no HTTP,
  no allocation, no copy), and all bytes as one flat broadcast: the NCCL ceiling.
GB/s = payload bytes / seconds (1 GB = 1e9 B), median over --repeats.
"""

import argparse
import asyncio
import statistics
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_common import write_json  # noqa: E402
from bench_shapes import SHAPES, shape_bytes  # noqa: E402

from miles.weight_sync.process_group import destroy_custom_process_group, init_custom_process_group  # noqa: E402

BUCKET_BYTES = 512 << 20
"""DistributedWeightSender's default bucket (= weight_sync.bucket_mb's default)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_tensors(model: str, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [(name, torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16))
            for name, shape in SHAPES[model].hf_tensors()]


def raw_broadcasts(tensors: list[torch.Tensor], group, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each timed round of per-tensor broadcasts from rank 0 (after one warm-up round)."""
    seconds = []
    for i in range(repeats + 1):
        _sync(device)
        began = time.perf_counter()
        for t in tensors:
            dist.broadcast(t, src=0, group=group)
        _sync(device)
        if i:
            seconds.append(time.perf_counter() - began)
    return seconds


# -- receiver (the SGLang side) ------------------------------------------------------------------
class Receiver:
    """HTTP endpoints of SGLang's distributed weight update (see the module docstring), plus /raw_bench."""

    def __init__(self, model: str, device: torch.device):
        self.device = device
        self.params = {name: torch.empty(shape, dtype=torch.bfloat16, device=device)
                       for name, shape in SHAPES[model].hf_tensors()}
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.lock = threading.Lock()

    def init_group(self, body: dict) -> dict:
        self.groups[body["group_name"]] = init_custom_process_group(
            body["backend"], f"tcp://{body['master_address']}:{body['master_port']}", body["world_size"],
            body["rank_offset"], body["group_name"], timedelta(seconds=300))
        return {"success": True, "message": "joined"}

    def update(self, body: dict) -> dict:
        group = self.groups[body["group_name"]]
        dtypes = [getattr(torch, d) for d in body["dtypes"]]
        with self.lock:
            if body.get("load_format") == "flattened_bucket":
                numels = [int(torch.Size(s).numel()) for s in body["shapes"]]
                flat = torch.empty(sum(numels), dtype=dtypes[0], device=self.device)
                dist.broadcast(flat, src=0, group=group)
                weights = [(n, t.view(s)) for n, t, s in zip(body["names"], flat.split(numels), body["shapes"])]
            else:
                weights, handles = [], []
                for name, dtype, shape in zip(body["names"], dtypes, body["shapes"]):
                    t = torch.empty(shape, dtype=dtype, device=self.device)
                    handles.append(dist.broadcast(t, src=0, group=group, async_op=True))
                    weights.append((name, t))
                for handle in handles:
                    handle.wait()
            for name, t in weights:  # load_weights: copy into the model's parameter
                self.params[name].copy_(t)
            _sync(self.device)
        return {"success": True, "message": "updated"}

    def destroy(self, body: dict) -> dict:
        destroy_custom_process_group(self.groups.pop(body["group_name"]))
        return {"success": True, "message": "destroyed"}

    def raw_bench(self, body: dict) -> dict:
        group = init_custom_process_group(body["backend"], f"tcp://{body['master_address']}:{body['master_port']}",
                                          2, 1, body["group_name"], timedelta(seconds=300))
        try:
            tensors = list(self.params.values())
            raw_broadcasts(tensors, group, self.device, body["repeats"])
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.bfloat16, device=self.device)
            raw_broadcasts([flat], group, self.device, body["repeats"])
        finally:
            destroy_custom_process_group(group)
        return {"success": True, "message": "raw done"}


def serve(port: int, receiver: Receiver) -> None:
    from aiohttp import web

    def route(fn):
        def on_device(body: dict) -> dict:
            if receiver.device.type == "cuda":
                torch.cuda.set_device(receiver.device)  # per thread: to_thread's pool threads start on cuda:0
            return fn(body)

        async def handler(request: web.Request) -> web.Response:
            body = await request.json()
            try:
                return web.json_response(await asyncio.to_thread(on_device, body))
            except Exception as exc:  # process boundary: answer the error as SGLang does, with the traceback logged
                traceback.print_exc()
                return web.json_response({"success": False, "message": f"{type(exc).__name__}: {exc}"})
        return handler

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=1 << 30)
    app.add_routes([web.get("/health", health),
                    web.post("/init_weights_update_group", route(receiver.init_group)),
                    web.post("/update_weights_from_distributed", route(receiver.update)),
                    web.post("/destroy_weights_update_group", route(receiver.destroy)),
                    web.post("/raw_bench", route(receiver.raw_bench))])
    print(f"receiver: listening on 127.0.0.1:{port}, model buffers on {receiver.device}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


# -- sender (the trainer side) -------------------------------------------------------------------
def _wait_health(url: str, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with opener.open(url + "/health", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"receiver at {url} not healthy after {timeout_s:.0f} s") from None
            time.sleep(0.2)


def _gbps(num_bytes: int, seconds: list[float]) -> dict:
    median = statistics.median(seconds)
    return {"gb_per_s": num_bytes / median / 1e9, "seconds_median": median, "seconds": seconds}


def send_bench(args) -> int:
    from miles.engines.client import EngineClient
    from miles.weight_sync.distributed import DistributedWeightSender

    from bench_common import free_port

    device = torch.device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    named = make_tensors(args.model, device)
    num_bytes = shape_bytes(SHAPES[args.model])
    _wait_health(args.engine_url, 120)
    report = {"model_shape": args.model, "num_tensors": len(named), "bytes": num_bytes, "backend": backend,
              "bucket_bytes": BUCKET_BYTES, "repeats": args.repeats,
              "device_pair": f"{args.device} -> receiver {args.receiver_device}",
              "receiver": "torch.distributed stand-in for SGLang's receiving side (see bench_weight_sync.py)"}
    sender = DistributedWeightSender([args.engine_url], "127.0.0.1", free_port(), backend=backend,
                                     group_name="miles_bench", timeout_s=300)
    began = time.perf_counter()
    sender.connect()
    report["connect_seconds"] = time.perf_counter() - began
    variants = [("miles", None, BUCKET_BYTES), ("miles_flattened_bucket", "flattened_bucket", BUCKET_BYTES)]
    variants += [(f"miles_bucket_{mb}mb", None, mb << 20) for mb in args.bucket_sweep_mb]
    try:
        for key, load_format, bucket_bytes in variants:
            seconds, buckets = [], 0
            for i in range(args.repeats + 1):
                _sync(device)
                began = time.perf_counter()
                stats = sender.send(named, weight_version=f"{key}-{i}", bucket_bytes=bucket_bytes,
                                    load_format=load_format)
                _sync(device)
                if i:
                    seconds.append(time.perf_counter() - began)
                else:
                    report[f"{key}_first_send_seconds"] = time.perf_counter() - began
                buckets = stats.num_buckets
                assert stats.num_bytes == num_bytes, (stats.num_bytes, num_bytes)
            report[key] = {**_gbps(num_bytes, seconds), "num_buckets": buckets, "bucket_mb": bucket_bytes >> 20}
            write_json(args.out, report)
            print(f"P2 {key}: {report[key]['gb_per_s']:.2f} GB/s", flush=True)
    finally:
        sender.close()

    port = free_port()
    body = {"master_address": "127.0.0.1", "master_port": port, "backend": backend, "group_name": "raw_bench",
            "repeats": args.repeats}
    answer: dict = {}

    async def post() -> None:
        async with EngineClient(args.engine_url, timeout_s=300) as client:
            answer.update(await client.request("POST", "/raw_bench", body))

    thread = threading.Thread(target=lambda: asyncio.run(post()), daemon=True)
    thread.start()
    group = init_custom_process_group(backend, f"tcp://127.0.0.1:{port}", 2, 0, "raw_bench", timedelta(seconds=300))
    try:
        tensors = [t for _, t in named]
        report["raw_per_tensor"] = _gbps(num_bytes, raw_broadcasts(tensors, group, device, args.repeats))
        del tensors
        flat = torch.cat([t.flatten() for _, t in named])
        report["raw_flat"] = _gbps(num_bytes, raw_broadcasts([flat], group, device, args.repeats))
    finally:
        destroy_custom_process_group(group)
    thread.join(60)
    if not answer.get("success"):
        raise RuntimeError(f"receiver's /raw_bench answered {answer}")
    for key in ("raw_flat", *(key for key, _, _ in variants)):
        report[key]["ratio_to_raw_per_tensor"] = report[key]["gb_per_s"] / report["raw_per_tensor"]["gb_per_s"]
    report["miles"]["ratio_to_raw_flat"] = report["miles"]["gb_per_s"] / report["raw_flat"]["gb_per_s"]
    write_json(args.out, report)
    print(f"P2 raw per tensor {report['raw_per_tensor']['gb_per_s']:.2f} GB/s, raw flat "
          f"{report['raw_flat']['gb_per_s']:.2f} GB/s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=("receiver", "sender"))
    ap.add_argument("--model", default="qwen3-1.7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--port", type=int, help="receiver: HTTP port")
    ap.add_argument("--engine-url", help="sender: the receiver's URL")
    ap.add_argument("--receiver-device", default="cuda:1", help="sender: for the report only")
    ap.add_argument("--out", type=Path, help="sender: JSON result")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-sweep-mb", type=lambda v: [int(x) for x in v.split(",") if x], default=[64, 256, 1024],
                    help="sender: also time DistributedWeightSender with these bucket sizes (MB, comma-separated)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.role == "receiver":
        if args.port is None:
            ap.error("receiver needs --port")
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        serve(args.port, Receiver(args.model, device))
        return 0
    if args.engine_url is None or args.out is None:
        ap.error("sender needs --engine-url and --out")
    return send_bench(args)


if __name__ == "__main__":
    sys.exit(main())
