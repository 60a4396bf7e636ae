"""tools/gpu/bench_gpu.py's plumbing on the CPU: FLOP accounting, child processes under a deadline,
one failing part not losing the others, and the markdown report of half-done results."""

import json
import sys
import time
from pathlib import Path

import pytest

GPU_TOOLS = Path(__file__).resolve().parents[3] / "tools" / "gpu"


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.syspath_prepend(str(GPU_TOOLS))
    import bench_common
    import bench_gpu
    import bench_report
    import bench_shapes

    return bench_common, bench_gpu, bench_report, bench_shapes


def test_qwen3_shapes_match_the_published_parameter_counts(tools):
    shapes = tools[3]
    assert round(shapes.SHAPES["qwen3-1.7b"].total_params / 1e9, 2) == 1.72  # Qwen3-1.7B: 1.7B, tied embeddings
    assert round(shapes.SHAPES["qwen3-8b"].total_params / 1e9, 2) == 8.19  # Qwen3-8B: 8.2B
    assert shapes.shape_bytes(shapes.SHAPES["qwen3-1.7b"]) == 2 * shapes.SHAPES["qwen3-1.7b"].total_params


def test_train_flops_per_token_by_hand(tools):
    tiny = tools[3].SHAPES["tiny"]  # hidden 64, 2 layers, 4 heads x 16, 2 KV heads, ffn 128, vocab 512
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128
    matmul = 2 * per_layer + 512 * 64
    assert tiny.matmul_params == matmul
    assert tiny.train_flops_per_token(100) == 6 * matmul + 12 * 2 * 4 * 16 * 100


def test_peak_flops_by_device_name(tools):
    peak = tools[3].peak_bf16_flops
    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == 989.4e12
    assert peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA GB200") == 2500e12
    assert peak("cpu") is None


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_children_stops_a_hung_child_at_the_deadline(tools, tmp_path):
    common = tools[0]
    began = time.monotonic()
    done, hung = common.run_children([("done", _py("print('hi')"), {}), ("hung", _py("import time; time.sleep(60)"), {})],
                                     timeout_s=3, log_dir=tmp_path, term_grace_s=2)
    assert time.monotonic() - began < 15
    assert (done.returncode, done.stopped) == (0, "")
    assert hung.returncode is None and "deadline of 3 s" in hung.stopped
    assert (tmp_path / "done.log").read_text() == "hi\n"
    assert "hung stopped (deadline of 3 s)" in common.describe_failure([done, hung])


def test_run_children_stops_the_peers_of_a_failed_child_and_services(tools, tmp_path):
    common = tools[0]
    began = time.monotonic()
    failed, peer = common.run_children([("failed", _py("import sys; print('boom'); sys.exit(3)"), {}),
                                        ("peer", _py("import time; time.sleep(60)"), {})],
                                       timeout_s=50, log_dir=tmp_path, sibling_grace_s=1, term_grace_s=2)
    assert time.monotonic() - began < 15
    assert failed.returncode == 3 and peer.returncode is None and peer.stopped == "a sibling process failed"
    assert common.describe_failure([failed]).startswith("failed exited with code 3: boom")

    server, client = common.run_children([("server", _py("import time; time.sleep(60)"), {}),
                                          ("client", _py("import time; time.sleep(0.5)"), {})],
                                         timeout_s=50, log_dir=tmp_path, term_grace_s=2, services=("server",))
    assert (server.returncode, client.returncode) == (0, 0)
    assert common.describe_failure([server, client]) is None


def test_a_failing_part_does_not_lose_the_others(tools, tmp_path, monkeypatch):
    _, bench_gpu, _, _ = tools

    def broken(ctx, timeout_s):
        raise RuntimeError("P1 exploded")

    def fine(ctx, timeout_s):
        return {"status": "ok", "model_shape": "small", "bytes": 2e9, "num_tensors": 3, "repeats": 3,
                "bucket_bytes": 512 << 20, "miles": {"gb_per_s": 10.0, "seconds_median": 0.2, "ratio_to_raw_per_tensor": 0.5},
                "raw_per_tensor": {"gb_per_s": 20.0, "seconds_median": 0.1}}

    monkeypatch.setitem(bench_gpu.RUNNERS, "p1", broken)
    monkeypatch.setitem(bench_gpu.RUNNERS, "p2", fine)
    monkeypatch.setattr(bench_gpu, "setup_env", lambda site: None)
    monkeypatch.setattr(bench_gpu.signal, "signal", lambda *args: None)
    rc = bench_gpu.main(["--dry-run", "--out", str(tmp_path), "--only", "p1,p2"])
    assert rc == 1
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["parts"]["p1"]["status"] == "failed"
    assert report["parts"]["p1"]["error"] == "RuntimeError: P1 exploded"
    assert report["parts"]["p2"]["status"] == "ok" and report["parts"]["p2"]["miles"]["gb_per_s"] == 10.0
    md = (tmp_path / "bench_gpu.md").read_text()
    assert "| P1 | failed |" in md and "RuntimeError: P1 exploded" in md
    assert "| Miles DistributedWeightSender (HTTP per 512 MB bucket, per-tensor broadcast) | 10.00 | 0.2000 | 0.50 |" in md
    assert "| raw NCCL broadcast, tensor by tensor | 20.00 | 0.1000 | 1.00 |" in md


def test_report_of_a_half_done_p1(tools):
    report = tools[2].markdown_report({"meta": {"dry_run": False}, "parts": {"p1": {"status": "partial", "seconds": 99, "jobs": {
        "tp1": {"tp_size": 1, "device_name": "NVIDIA H100 80GB HBM3", "peak_bf16_flops": 989.4e12, "models": {
            "qwen3-1.7b": {"total_params": 1.72e9, "tp_size": 1, "seq_len": 4096, "micro_batch": 2, "iter_ms": 250.0,
                           "tokens_per_s": 32768.0, "tflops_per_gpu": 430.6, "mfu": 0.4352, "peak_memory_gb": 35.2},
            "qwen3-8b": {"model": "qwen3-8b", "error": "CUDA OOM at micro_batch 1 seq 2048: ..."}}},
        "tp2": {"error": "p1-tp2-rank1 stopped (deadline of 100 s): NCCL watchdog"}}}}})
    assert "| qwen3-1.7b | 1.72 B | 1 | 4096 x 2 | 250.0 | 32,768 | 430.6 | 43.5% | 35.2 |" in report
    assert "CUDA OOM at micro_batch 1 seq 2048" in report
    assert "p1-tp2-rank1 stopped (deadline of 100 s): NCCL watchdog" in report
    assert "peak dense bf16 989.4 TFLOP/s" in report
    assert "| P1 | partial | 99 |" in report
