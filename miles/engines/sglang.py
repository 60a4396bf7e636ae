"""The SGLang engine adapter: one `python -m sglang.launch_server` per engine, pinned and probed.

    sg = SGLangConfig(mem_fraction_static=0.3)
    server = launch_sglang_engine(model_dir, engine_cfg, sg, port=30000, gpu_id=1, seed=0, log_path=log)
    info = server.wait_ready(600)           # /health_generate 200, then /server_info + /model_info probe
    register_with_router(router_url, server.url)
    ...
    server.stop()                           # SIGTERM to the server's process group, SIGKILL after a grace

The server runs in a session of its own (process group id == its PID), and `stop` signals that
group only: SGLang's scheduler and detokenizer subprocesses go with it, nothing else is touched.
The same `EngineClient` talks to SGLang and to the embedded engine; only the launch differs.

Pinned version: the adapter is verified against SGLang `PINNED_SGLANG_VERSION` (docs/gpu.md).
`wait_ready` reads `/server_info`'s "version" and raises `SGLangVersionError` on any other
version (or only warns with `SGLangConfig.on_version_mismatch="warn"`): SGLang renames endpoints
and flags between patch releases, so a silent mismatch surfaces later as odd 404s or hangs.

Defaults of `SGLangConfig` are the flags the device smoke test needed with the offline 0.5.17
wheel set (Triton attention, PyTorch sampling, no CUDA graphs, no warm-up): that wheel set drops
the FA3/FlashMLA kernels. On a full install, set `attention_backend=None` etc. to let SGLang pick.
"""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from miles.engines.client import EngineClient, EngineError
from miles.engines.config import EngineConfig
from miles.engines.process import ServerProcess
from miles.errors import ConfigError

logger = logging.getLogger(__name__)

PINNED_SGLANG_VERSION = "0.5.17"
"""The SGLang release this adapter (flags, endpoints, JSON shapes) was verified against."""
VERSION_POLICIES = ("error", "warn")
SGLANG_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
"""EngineConfig.dtype -> SGLang --dtype."""
_MOE_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class SGLangVersionError(RuntimeError):
    """The running SGLang is not the pinned version (or did not say which it is)."""


@dataclass(frozen=True)
class SGLangConfig:
    """How each SGLang server is launched (engine.kind == "sglang"); generic engine fields stay in EngineConfig."""

    tp_size: int = 1
    """Tensor-parallel size of one engine (--tp-size); engine i uses GPUs first_gpu + i*tp_size ..."""
    first_gpu: int = 1
    """GPU index of engine 0 on its node (--base-gpu-id). Local executor: GPU 0 holds the trainer."""
    mem_fraction_static: float | None = None
    """Fraction of GPU memory for weights + KV cache (--mem-fraction-static); None = SGLang's choice."""
    colocate: bool = False
    """Engines share GPUs with the trainer: adds --enable-memory-saver (release/resume memory)."""
    return_routed_experts: bool | None = None
    """--enable-return-routed-experts (R3 capture); None = on exactly when the checkpoint is MoE."""
    attention_backend: str | None = "triton"
    """--attention-backend; None = SGLang's default (needs the FA3/FlashInfer kernels installed)."""
    sampling_backend: str | None = "pytorch"
    """--sampling-backend; None = SGLang's default (FlashInfer sampling)."""
    disable_cuda_graph: bool = True
    """--disable-cuda-graph: faster start, slower decode; turn off for throughput runs."""
    skip_server_warmup: bool = True
    """--skip-server-warmup: the first request (here: the health check) compiles kernels instead."""
    log_level: str = "info"
    """--log-level of the server."""
    pinned_version: str = PINNED_SGLANG_VERSION
    """SGLang version the probe expects in /server_info."""
    on_version_mismatch: str = "error"
    """"error": raise SGLangVersionError when the running version differs; "warn": log and go on."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    """More launch_server flags, appended after everything else (so they win over the above)."""

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ConfigError(f"sglang.tp_size must be >= 1, got {self.tp_size}")
        if self.first_gpu < 0:
            raise ConfigError(f"sglang.first_gpu must be >= 0, got {self.first_gpu}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ConfigError(f"sglang.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.on_version_mismatch not in VERSION_POLICIES:
            raise ConfigError(f"sglang.on_version_mismatch={self.on_version_mismatch!r} is not one of "
                              f"{VERSION_POLICIES}")

    def gpu_of(self, engine_index: int) -> int:
        """--base-gpu-id of engine `engine_index` on its node."""
        return self.first_gpu + engine_index * self.tp_size


@dataclass(frozen=True)
class SGLangInfo:
    """What the start-up probe learned from /server_info and /model_info."""

    version: str
    """SGLang version the server reports."""
    model_path: str
    """Checkpoint the server loaded."""
    tp_size: int
    """Tensor-parallel size the server runs with."""
    architectures: tuple[str, ...]
    """HF architectures of the loaded model."""
    weight_version: str
    """Weight version the server reports (changes with every weight update)."""
    return_routed_experts: bool
    """Whether routed-experts capture is on."""


def is_moe_checkpoint(model_path: str | os.PathLike) -> bool:
    """True when the HF config.json in model_path declares routed experts."""
    config_file = Path(model_path, "config.json")
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {config_file}: {exc}") from exc
    hf = hf.get("text_config", hf)  # multimodal wrappers keep the LM config inside
    return any((hf.get(k) or 0) > 1 for k in _MOE_EXPERT_KEYS)


def build_sglang_args(model_path: str | os.PathLike, engine: EngineConfig, sglang: SGLangConfig, port: int,
                      gpu_id: int, seed: int, moe: bool) -> list[str]:
    """The `sglang.launch_server` flags of one engine (without `python -m sglang.launch_server`)."""
    args = ["--model-path", str(model_path), "--host", engine.host, "--port", str(port),
            "--tp-size", str(sglang.tp_size), "--dtype", SGLANG_DTYPES[engine.dtype],
            "--base-gpu-id", str(gpu_id), "--random-seed", str(seed), "--log-level", sglang.log_level]
    if sglang.mem_fraction_static is not None:
        args += ["--mem-fraction-static", str(sglang.mem_fraction_static)]
    routed = moe if sglang.return_routed_experts is None else sglang.return_routed_experts
    if routed:
        args.append("--enable-return-routed-experts")
    if sglang.colocate:
        args.append("--enable-memory-saver")
    if sglang.attention_backend is not None:
        args += ["--attention-backend", sglang.attention_backend]
    if sglang.sampling_backend is not None:
        args += ["--sampling-backend", sglang.sampling_backend]
    if sglang.disable_cuda_graph:
        args.append("--disable-cuda-graph")
    if sglang.skip_server_warmup:
        args.append("--skip-server-warmup")
    return [*args, *engine.extra_args, *sglang.extra_args]


def parse_probe(server_info: Mapping[str, Any], model_info: Mapping[str, Any]) -> SGLangInfo:
    """Read the fields we rely on out of /server_info and /model_info (raise SGLangVersionError if
    the server does not report a version: then it is not SGLang, or a very different one)."""
    version = server_info.get("version")
    if not isinstance(version, str) or not version:
        raise SGLangVersionError(f"/server_info has no 'version' field (keys: {sorted(server_info)[:20]}...); "
                                 f"is this an SGLang server?")
    return SGLangInfo(
        version=version,
        model_path=str(model_info.get("model_path", server_info.get("model_path", ""))),
        tp_size=int(server_info.get("tp_size", 1)),
        architectures=tuple(model_info.get("architectures") or ()),
        weight_version=str(model_info.get("weight_version", server_info.get("weight_version", ""))),
        return_routed_experts=bool(server_info.get("enable_return_routed_experts", False)),
    )


def check_version(info: SGLangInfo, sglang: SGLangConfig, url: str = "") -> None:
    """Raise SGLangVersionError (or warn, per sglang.on_version_mismatch) unless the version is pinned."""
    if info.version == sglang.pinned_version:
        return
    msg = (f"SGLang at {url or '?'} is version {info.version}, but Miles is pinned to {sglang.pinned_version} "
           f"(install sglang=={sglang.pinned_version}, or set sglang.on_version_mismatch=warn to try anyway)")
    if sglang.on_version_mismatch == "error":
        raise SGLangVersionError(msg)
    logger.warning(msg)


def decode_routed_experts(meta_info: Mapping[str, Any], num_layers: int, top_k: int) -> np.ndarray:
    """meta_info["routed_experts"] (base64 of int32) as an array [tokens, num_layers, top_k].

    tokens = prompt + completion - 1 - routed_experts_start_len: one row per position that went
    through the model (the last sampled token never did). Raises ValueError on a size mismatch.
    """
    import base64

    encoded = meta_info.get("routed_experts")
    if not isinstance(encoded, str):
        raise ValueError("meta_info has no 'routed_experts' string: was the server started with "
                         "--enable-return-routed-experts and the request sent return_routed_experts=true?")
    flat = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    per_token = num_layers * top_k
    if flat.size % per_token:
        raise ValueError(f"routed_experts holds {flat.size} int32 values, not a multiple of "
                         f"num_layers*top_k = {num_layers}*{top_k}")
    return flat.reshape(-1, num_layers, top_k)


class SGLangServer(ServerProcess):
    """A launch_server process; stopping it stops its whole process group (scheduler, detokenizer)."""

    def __init__(self, name: str, cmd: list[str], host: str, port: int, log_path: str | os.PathLike,
                 sglang: SGLangConfig):
        super().__init__(name, cmd, host, port, log_path)
        self.sglang = sglang
        self.info: SGLangInfo | None = None

    def wait_ready(self, timeout_s: float) -> SGLangInfo:
        """Wait for /health_generate (a real 1-token generation), then probe the API and check the version."""
        self.wait_healthy(timeout_s, path="/health_generate")
        self.info = probe_sglang(self.url)
        check_version(self.info, self.sglang, self.url)
        logger.info("%s ready: SGLang %s, %s (tp %d, routed experts %s)", self.name, self.info.version,
                    ",".join(self.info.architectures) or "?", self.info.tp_size, self.info.return_routed_experts)
        return self.info

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM to the process group, wait up to timeout_s, then SIGKILL the group. Returns the exit code."""
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM for %.0f s, killing its group", self.name, self.pid,
                               timeout_s)
                self.kill()
        self._signal_group(signal.SIGKILL)  # children that outlived the main process
        self._wait_group_gone(timeout_s)  # their GPU memory is free once they are gone
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group now and reap the main process."""
        self._signal_group(signal.SIGKILL)
        self._popen.wait()

    def _wait_group_gone(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while _group_has_live_members(self.pid):
            if time.monotonic() > deadline:
                logger.warning("%s: processes of group %d still alive %.0f s after SIGKILL", self.name, self.pid,
                               timeout_s)
                return
            time.sleep(0.1)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # start_new_session=True: the group id is our child's PID
        except ProcessLookupError:
            pass


def _group_has_live_members(pgid: int) -> bool:
    """Whether any non-zombie process is in process group pgid (Linux /proc; else kill(-pgid, 0))."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def launch_sglang_engine(model_path: str | os.PathLike, engine: EngineConfig, sglang: SGLangConfig, port: int,
                         gpu_id: int, seed: int, log_path: str | os.PathLike,
                         python: str = sys.executable) -> SGLangServer:
    """Start `python -m sglang.launch_server` for one engine on GPUs gpu_id .. gpu_id+tp_size-1 (not waited for)."""
    moe = is_moe_checkpoint(model_path)
    cmd = [python, "-m", "sglang.launch_server",
           *build_sglang_args(model_path, engine, sglang, port, gpu_id, seed, moe)]
    return SGLangServer(f"sglang:{port}", cmd, engine.host, port, log_path, sglang)


def probe_sglang(url: str, timeout_s: float = 30.0) -> SGLangInfo:
    """GET /server_info and /model_info through EngineClient (call from synchronous code)."""

    async def fetch() -> tuple[dict, dict]:
        async with EngineClient(url, timeout_s=timeout_s) as client:
            return await client.server_info(), await client.model_info()

    server_info, model_info = asyncio.run(fetch())
    if not isinstance(server_info, dict) or not isinstance(model_info, dict):
        raise SGLangVersionError(f"{url}: /server_info or /model_info did not answer JSON objects")
    return parse_probe(server_info, model_info)


def register_with_router(router_url: str, engine_url: str, timeout_s: float = 30.0) -> None:
    """POST /workers {"url": engine_url} to our router; an engine already registered is fine."""

    async def post() -> None:
        async with EngineClient(router_url, timeout_s=timeout_s) as client:
            try:
                await client.request("POST", "/workers", {"url": engine_url})
            except EngineError as exc:
                if exc.status != 409:
                    raise

    asyncio.run(post())
    logger.info("registered %s with the router at %s", engine_url, router_url)


def launch_local_sglang_engines(model_path: str | os.PathLike, engine: EngineConfig, sglang: SGLangConfig,
                                seed: int, log_dir: Path, started: list) -> None:
    """Launch engine.num_engines servers (engine i on port base_port+i, GPU sglang.gpu_of(i), seed+i),
    appending each to `started` as soon as it runs (so the caller can stop them), then wait for all."""
    for i in range(engine.num_engines):
        started.append(launch_sglang_engine(model_path, engine, sglang, engine.base_port + i, sglang.gpu_of(i),
                                            seed + i, Path(log_dir) / f"engine{i}.log"))
    for server in started:
        server.wait_ready(engine.startup_timeout_s)

