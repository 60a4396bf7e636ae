#!/usr/bin/env python3
"""Write and read throughput and size of the R3 routing dump store (miles/routing/dump_store.py).

    python tools/bench_r3_store.py [--samples 256] [--tokens 1024] [--layers 48] [--top-k 8]
                                   [--experts 128] [--dp 8] [--compression none|lzf|gzip|all]
                                   [--repeats 3] [--dir DIR] [--out FILE.json]

Writes one step of synthetic routing (uniform random expert ids: the worst case for compression,
real routing is skewed) through `RoutingDumpWriter`, then reads it back with `RoutingDumpStore`:
all samples, one data-parallel rank's contiguous 1/dp, and a strided 1/dp (samples r, r+dp, ...).
MB/s count the int32 routing delivered to / from the caller (samples x tokens x L x K x 4 bytes),
so modes with different on-disk sizes compare on the same work. Reads run right after the write,
from the page cache (a trainer reads a step written minutes before on the same node). Reports
bytes per token raw (int32) and on disk, and the compression ratio. Writes JSON to --out and
prints one line per mode. `run(...)` returns the same dict for `make bench`.
"""

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from statistics import median
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from miles.routing.dump_store import RoutingDumpStore  # noqa: E402

POOL = 16
"""Distinct synthetic samples, reused cyclically (keeps memory small; HDF5 does not deduplicate)."""


def run(num_samples: int = 256, tokens: int = 1024, num_layers: int = 48, top_k: int = 8,
        num_experts: int | None = 128, dp: int = 8, compression: str | None = None,
        workdir: str | os.PathLike | None = None, seed: int = 0, repeats: int = 3) -> dict:
    """Benchmark one storage mode; returns the result dict (see the module docstring). Every
    timing is the median of `repeats` runs (2 shared CPU cores are noisy)."""
    rng = np.random.default_rng(seed)
    pool = [rng.integers(0, num_experts or 256, size=(tokens, num_layers, top_k), dtype=np.int32)
            for _ in range(min(POOL, num_samples))]
    ids = [f"{i // 8}-{i % 8}" for i in range(num_samples)]
    raw_bytes = num_samples * tokens * num_layers * top_k * 4
    with tempfile.TemporaryDirectory(prefix="bench-r3-", dir=workdir) as tmp:
        store = RoutingDumpStore(tmp)

        def timed_write() -> float:
            t = time.perf_counter()
            with store.writer(0, num_layers, top_k, num_experts, compression=compression) as w:
                for i, sid in enumerate(ids):
                    w.add(sid, pool[i % len(pool)])
            return time.perf_counter() - t

        write_s = median(timed_write() for _ in range(repeats))
        file_bytes = store.path(0).stat().st_size

        def timed_read(subset: list[str]) -> float:
            t = time.perf_counter()
            got = store.read_step(0, subset, expected_tokens=[tokens] * len(subset))
            seconds = time.perf_counter() - t
            k = ids.index(subset[-1])
            assert np.array_equal(got[-1], pool[k % len(pool)]), "read back differs from what was written"
            return seconds

        per_rank = max(1, num_samples // dp)
        full_s = median(timed_read(ids) for _ in range(repeats))
        contiguous_s = median(timed_read(ids[:per_rank]) for _ in range(repeats))
        strided_s = median(timed_read(ids[::dp][:per_rank]) for _ in range(repeats))
    mb = raw_bytes / 1e6
    subset_mb = mb * per_rank / num_samples
    return {
        "compression": compression or "none",
        "samples": num_samples, "tokens_per_sample": tokens, "num_layers": num_layers, "top_k": top_k,
        "num_experts": num_experts, "dp": dp, "repeats": repeats,
        "raw_mb": mb, "file_mb": file_bytes / 1e6,
        "write_s": write_s, "write_mb_s": mb / write_s,
        "read_full_s": full_s, "read_full_mb_s": mb / full_s,
        "read_rank_contiguous_s": contiguous_s, "read_rank_contiguous_mb_s": subset_mb / contiguous_s,
        "read_rank_strided_s": strided_s, "read_rank_strided_mb_s": subset_mb / strided_s,
        "raw_bytes_per_token": num_layers * top_k * 4,
        "disk_bytes_per_token": file_bytes / (num_samples * tokens),
        "compression_ratio": raw_bytes / file_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024, help="token positions per sample")
    ap.add_argument("--layers", type=int, default=48, help="MoE layers")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128, help="experts per layer (0 = unknown: int32 storage)")
    ap.add_argument("--dp", type=int, default=8, help="data-parallel ranks; one rank reads 1/dp of the samples")
    ap.add_argument("--compression", choices=("none", "lzf", "gzip", "all"), default="none")
    ap.add_argument("--repeats", type=int, default=3, help="timings are the median of this many runs")
    ap.add_argument("--dir", help="where to write the dump (default: $TMPDIR)")
    ap.add_argument("--out", type=Path, help="write the JSON result here")
    args = ap.parse_args(argv)
    modes = ("none", "lzf", "gzip") if args.compression == "all" else (args.compression,)
    results = []
    for mode in modes:
        r = run(args.samples, args.tokens, args.layers, args.top_k, args.experts or None, args.dp,
                None if mode == "none" else mode, args.dir, repeats=args.repeats)
        results.append(r)
        print(f"r3 store [{r['compression']}]: {r['raw_mb']:.0f} MB int32 -> {r['file_mb']:.0f} MB on disk "
              f"(x{r['compression_ratio']:.2f}, {r['disk_bytes_per_token']:.0f} B/token vs {r['raw_bytes_per_token']}); "
              f"write {r['write_mb_s']:.0f} MB/s, read full {r['read_full_mb_s']:.0f} MB/s, "
              f"1/{r['dp']} rank {r['read_rank_contiguous_mb_s']:.0f} MB/s contiguous, "
              f"{r['read_rank_strided_mb_s']:.0f} MB/s strided")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "cpus": os.cpu_count(), "modes": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
