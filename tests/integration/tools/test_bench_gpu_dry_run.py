"""`tools/gpu/bench_gpu.py --dry-run`: P1-P3 end to end on the CPU (gloo ranks for NCCL, the embedded
engine for SGLang), so the GPU run's control flow, numbers and report are checked before device time."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_dry_run_measures_and_reports_p1_to_p3(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "tools/gpu/bench_gpu.py", "--dry-run", "--out", str(out), "--only", "p1,p2,p3",
                           "--site", str(tmp_path / "no-site")], cwd=REPO, capture_output=True, text=True, timeout=420,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"^\[\d\d:\d\d:\d\d \+\s*\d+\.\ds\] P1 TP=2: 2 rank\(s\)", proc.stdout, re.M), proc.stdout[-2000:]
    report = json.loads((out / "bench_gpu.json").read_text())
    assert report["meta"]["dry_run"] is True
    assert {k: v["status"] for k, v in report["parts"].items()} == {"p1": "ok", "p2": "ok", "p3": "ok"}

    monkeypatch.syspath_prepend(str(REPO / "tools" / "gpu"))
    from bench_shapes import SHAPES, shape_bytes

    jobs = report["parts"]["p1"]["jobs"]
    for world in (1, 2):
        r = jobs[f"tp{world}"]["models"]["tiny"]
        assert (r["tp_size"], r["tokens_per_iter"], r["mfu"]) == (world, 2 * 64, None)  # CPU: no peak, no MFU
        assert r["flops_per_token"] == SHAPES["tiny"].train_flops_per_token(64)
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_iter"] / (r["iter_ms"] / 1e3))
        assert r["tflops_per_gpu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / world / 1e12)

    p2 = report["parts"]["p2"]
    assert p2["bytes"] == shape_bytes(SHAPES["small"]) and p2["num_tensors"] == len(SHAPES["small"].hf_tensors())
    for key in ("miles", "miles_flattened_bucket", "raw_per_tensor", "raw_flat"):
        assert len(p2[key]["seconds"]) == 3
        assert p2[key]["gb_per_s"] == pytest.approx(p2["bytes"] / p2[key]["seconds_median"] / 1e9)
    assert p2["miles"]["ratio_to_raw_per_tensor"] == pytest.approx(p2["miles"]["gb_per_s"] / p2["raw_per_tensor"]["gb_per_s"])

    p3 = report["parts"]["p3"]
    assert p3["engine"] == "embedded (dry run)"
    assert set(p3["paths"]) == {"direct", "router", "rollout_client"}
    for path in p3["paths"].values():
        assert [r["tokens"] for r in path["rounds"]] == [8 * 8]  # 8 requests x 8 tokens, ignore_eos
    assert p3["paths"]["direct"]["ratio_to_direct"] == 1.0

    md = (out / "bench_gpu.md").read_text()
    assert md.startswith("# GPU benchmarks (tools/gpu/bench_gpu.py) -- DRY RUN")
    for heading in ("## P1 trainer MFU", "## P2 weight sync", "## P3 rollout tokens/s"):
        assert heading in md
    for part in ("P1", "P2", "P3"):
        assert f"| {part} | ok |" in md
    assert not any((out / "work").glob("*.tmp"))
    assert (out / "logs" / "p1-tp2-rank1.log").exists() and (out / "logs" / "p3-router.log").exists()
