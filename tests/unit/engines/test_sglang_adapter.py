"""The SGLang adapter on CPU: launch flags, the start-up probe, routed-experts decoding, group stop,
router registration, and LocalRollout's engine.kind=sglang wiring. Real SGLang runs in tests/gpu.

The one stand-in is `SGLANG_STUB`: a 30-line aiohttp server answering /health_generate,
/server_info and /model_info with the JSON shapes SGLang 0.5.17 uses (sglang/srt/entrypoints/
http_server.py), so `SGLangServer.wait_ready` runs end to end (process, health, probe) without a GPU.
"""

import base64
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from miles.config.run_config import ModelConfig, RunConfig
from miles.engines.config import EngineConfig
from miles.engines.process import ServerStartError
from miles.engines.sglang import (
    PINNED_SGLANG_VERSION,
    SGLangConfig,
    SGLangServer,
    SGLangVersionError,
    build_sglang_args,
    check_version,
    decode_routed_experts,
    is_moe_checkpoint,
    parse_probe,
    register_with_router,
)
from miles.errors import ConfigError
from miles.launchers.local import LocalRollout
from miles.rollout.config import RolloutConfig
from miles.trainer.config import TrainerConfig

from .conftest import free_port

SERVER_INFO_0517 = {"model_path": "/m/qwen3", "tp_size": 2, "dp_size": 1, "enable_return_routed_experts": True,
                    "attention_backend": "triton", "version": "0.5.17", "internal_states": [{}]}
MODEL_INFO_0517 = {"model_path": "/m/qwen3", "tokenizer_path": "/m/qwen3", "is_generation": True,
                   "weight_version": "default", "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}

SGLANG_STUB = """
import sys
from aiohttp import web
port, version = int(sys.argv[1]), sys.argv[2]
async def health(request):
    return web.Response(status=200)
async def server_info(request):
    return web.json_response({"model_path": "/m/tiny", "tp_size": 1, "version": version,
                              "enable_return_routed_experts": False})
async def model_info(request):
    return web.json_response({"model_path": "/m/tiny", "is_generation": True, "weight_version": "default",
                              "architectures": ["Qwen3ForCausalLM"]})
app = web.Application()
app.router.add_get("/health_generate", health)
app.router.add_get("/server_info", server_info)
app.router.add_get("/model_info", model_info)
web.run_app(app, host="127.0.0.1", port=port, print=None)
"""


def write_config(path: Path, **fields) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3", **fields}))
    return path


def test_dense_launch_flags_are_the_verified_device_set(tmp_path):
    engine = EngineConfig(kind="sglang", dtype="bfloat16", host="127.0.0.1")
    args = build_sglang_args(tmp_path, engine, SGLangConfig(), port=30001, gpu_id=1, seed=7, moe=False)
    assert args == ["--model-path", str(tmp_path), "--host", "127.0.0.1", "--port", "30001", "--tp-size", "1",
                    "--dtype", "bfloat16", "--base-gpu-id", "1", "--random-seed", "7", "--log-level", "info",
                    "--attention-backend", "triton", "--sampling-backend", "pytorch", "--disable-cuda-graph",
                    "--skip-server-warmup"]


def test_moe_colocated_tp_and_extras(tmp_path):
    engine = EngineConfig(kind="sglang", dtype="float32", extra_args=("--max-running-requests", "8"))
    sg = SGLangConfig(tp_size=2, first_gpu=0, mem_fraction_static=0.3, colocate=True, attention_backend=None,
                      sampling_backend=None, disable_cuda_graph=False, skip_server_warmup=False,
                      extra_args=("--tp-size", "4"))
    args = build_sglang_args(tmp_path, engine, sg, port=1, gpu_id=sg.gpu_of(1), seed=0, moe=True)
    joined = " ".join(args)
    assert "--tp-size 2 --dtype float32 --base-gpu-id 2 " in joined  # engine 1 of TP=2 starts at GPU 2
    assert "--mem-fraction-static 0.3 --enable-return-routed-experts --enable-memory-saver" in joined
    for flag in ("--attention-backend", "--sampling-backend", "--disable-cuda-graph", "--skip-server-warmup"):
        assert flag not in args
    assert args[-4:] == ["--max-running-requests", "8", "--tp-size", "4"]  # extras last: they win in argparse


def test_routed_experts_flag_follows_the_checkpoint_unless_set(tmp_path):
    engine = EngineConfig(kind="sglang")
    dense = write_config(tmp_path / "dense", num_hidden_layers=2)
    moe = write_config(tmp_path / "moe", num_local_experts=8, num_experts_per_tok=2)  # transformers 5 spelling
    nested = tmp_path / "vl"
    nested.mkdir()
    (nested / "config.json").write_text(json.dumps({"text_config": {"num_experts": 64}}))
    assert [is_moe_checkpoint(p) for p in (dense, moe, nested)] == [False, True, True]
    flag = "--enable-return-routed-experts"
    assert flag in build_sglang_args(moe, engine, SGLangConfig(), 1, 0, 0, moe=True)
    assert flag not in build_sglang_args(moe, engine, SGLangConfig(return_routed_experts=False), 1, 0, 0, moe=True)
    assert flag in build_sglang_args(dense, engine, SGLangConfig(return_routed_experts=True), 1, 0, 0, moe=False)
    with pytest.raises(ConfigError, match="cannot read .*config.json"):
        is_moe_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("bad, match", [
    (dict(tp_size=0), "sglang.tp_size must be >= 1"),
    (dict(first_gpu=-1), "sglang.first_gpu must be >= 0"),
    (dict(mem_fraction_static=1.5), r"sglang.mem_fraction_static must be in \(0, 1\)"),
    (dict(on_version_mismatch="ignore"), "sglang.on_version_mismatch='ignore' is not one of"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        SGLangConfig(**bad)


def test_probe_parsing_and_version_policy(caplog):
    info = parse_probe(SERVER_INFO_0517, MODEL_INFO_0517)
    assert (info.version, info.model_path, info.tp_size, info.architectures, info.weight_version,
            info.return_routed_experts) == ("0.5.17", "/m/qwen3", 2, ("Qwen3MoeForCausalLM",), "default", True)
    check_version(info, SGLangConfig())  # the pinned version passes
    newer = parse_probe({**SERVER_INFO_0517, "version": "0.5.23"}, MODEL_INFO_0517)
    with pytest.raises(SGLangVersionError, match=r"SGLang at http://e:1 is version 0.5.23, but Miles is pinned to "
                                                 r"0.5.17 \(install sglang==0.5.17"):
        check_version(newer, SGLangConfig(), "http://e:1")
    check_version(newer, SGLangConfig(on_version_mismatch="warn"), "http://e:1")
    assert "is version 0.5.23, but Miles is pinned to 0.5.17" in caplog.text
    with pytest.raises(SGLangVersionError, match="/server_info has no 'version' field"):
        parse_probe({"tp_size": 1}, MODEL_INFO_0517)


def test_routed_experts_decode_round_trip():
    experts_TLK = np.random.default_rng(0).integers(0, 8, size=(11, 2, 2), dtype=np.int32)
    meta = {"routed_experts": base64.b64encode(experts_TLK.tobytes()).decode()}
    np.testing.assert_array_equal(decode_routed_experts(meta, num_layers=2, top_k=2), experts_TLK)
    assert decode_routed_experts(meta, num_layers=1, top_k=2).shape == (22, 1, 2)
    with pytest.raises(ValueError, match=r"44 int32 values, not a multiple of num_layers\*top_k = 3\*5"):
        decode_routed_experts(meta, num_layers=3, top_k=5)
    with pytest.raises(ValueError, match="--enable-return-routed-experts"):
        decode_routed_experts({"routed_experts": None}, 2, 2)


def start_stub(tmp_path: Path, version: str, on_mismatch: str = "error") -> SGLangServer:
    script = tmp_path / "sglang_stub.py"
    script.write_text(SGLANG_STUB)
    port = free_port()
    return SGLangServer("sglang-stub", [sys.executable, str(script), str(port), version], "127.0.0.1", port,
                        tmp_path / f"stub-{version}.log", SGLangConfig(on_version_mismatch=on_mismatch))


def test_wait_ready_probes_the_running_server(tmp_path):
    with start_stub(tmp_path, PINNED_SGLANG_VERSION) as server:
        info = server.wait_ready(60)
        assert server.info == info
        assert (info.version, info.architectures, info.return_routed_experts) == ("0.5.17", ("Qwen3ForCausalLM",), False)
    assert server.poll() is not None


def test_wait_ready_refuses_another_version(tmp_path):
    with start_stub(tmp_path, "0.5.23") as server:
        with pytest.raises(SGLangVersionError, match=f"{server.url} is version 0.5.23, but Miles is pinned to 0.5.17"):
            server.wait_ready(60)
    with start_stub(tmp_path, "0.5.23", on_mismatch="warn") as server:
        assert server.wait_ready(60).version == "0.5.23"


def test_stop_ends_the_whole_process_group(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    # The parent does not pass SIGTERM on to its child: only a signal to the group ends both.
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(child_pid_file)!r}, 'w').write(str(c.pid)); time.sleep(600)")
    server = SGLangServer("tree", [sys.executable, "-c", code], "127.0.0.1", free_port(), tmp_path / "tree.log",
                          SGLangConfig())
    deadline = time.monotonic() + 30
    while not child_pid_file.exists() or not child_pid_file.read_text():
        assert time.monotonic() < deadline, "the test process tree did not start"
        time.sleep(0.05)
    child = int(child_pid_file.read_text())
    assert os.getpgid(child) == server.pid  # same group as the server process
    assert server.stop(timeout_s=10) == -15
    assert not _alive(child), f"child {child} survived stop()"  # stop() returns once the group is gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped by init later) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_register_with_router(start_router):
    router = start_router([], ready=False)
    engine_url = f"http://127.0.0.1:{free_port()}"
    register_with_router(router.url, engine_url)
    register_with_router(router.url, engine_url)  # again: 409 from the router is fine
    workers = requests.get(router.url + "/workers", timeout=5).json()["workers"]
    assert [w["url"] for w in workers] == [engine_url]


def test_local_rollout_starts_sglang_and_cleans_up_when_it_fails(tmp_path):
    """No sglang on this machine: the server exits, the error carries its log, nothing is left running."""
    model = write_config(tmp_path / "model", num_hidden_layers=2)
    cfg = RunConfig(model=ModelConfig(path=str(model)),
                    engine=EngineConfig(kind="sglang", num_engines=2, base_port=free_port(), startup_timeout_s=60),
                    rollout=RolloutConfig(rollout_batch_size=1, n_samples_per_prompt=1),
                    trainer=TrainerConfig(num_steps_per_rollout=1))
    rollout = LocalRollout(cfg, tmp_path / "run", sglang=SGLangConfig(first_gpu=3))
    with pytest.raises(ServerStartError, match=r"sglang:\d+ \(pid \d+\) exited with code 1") as err:
        rollout.__enter__()
    assert "No module named 'sglang'" in str(err.value)
    assert rollout.engines == [] and rollout.router is None
    assert "No module named 'sglang'" in (tmp_path / "run" / "logs" / "engine0.log").read_text()
    assert (tmp_path / "run" / "logs" / "engine1.log").is_file()  # both were launched (engine 1 may be stopped
    # before it got as far as failing: the first failure stops everything)
