"""Configuration of the rollout engines (embedded or SGLang) and of the router in front of them."""

from dataclasses import dataclass, field

from miles.errors import ConfigError

ENGINE_KINDS = ("embedded", "sglang")
ROUTER_POLICIES = ("least_in_flight", "round_robin")


@dataclass(frozen=True)
class EngineConfig:
    """How many rollout engines to start and how each one serves."""

    kind: str = "embedded"
    """Engine implementation: "embedded" (transformers on CPU/GPU, SGLang's HTTP API) or "sglang"."""
    num_engines: int = 1
    """Number of engine servers (each one is a task of het-group 0)."""
    host: str = "127.0.0.1"
    """Address the engines bind to."""
    base_port: int = 30000
    """Engine i listens on base_port + i (local executor); on Slurm ports derive from the job id."""
    dtype: str = "float32"
    """Weights/compute dtype of the engine: float32, bfloat16 or float16."""
    max_batch_size: int = 64
    """Most requests decoded together in one batch (embedded engine)."""
    num_threads: int = 0
    """Torch intra-op threads per embedded engine (0 = torch's default). Set 1 when engines share
    a small CPU with the trainer: two threads per process on two shared cores thrash."""
    startup_timeout_s: float = 120.0
    """Seconds to wait for an engine's /health_generate before giving up."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    """Extra command-line flags passed verbatim to the engine server."""

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ConfigError(f"engine.kind={self.kind!r} is not one of {ENGINE_KINDS}")
        if self.num_engines < 1:
            raise ConfigError(f"engine.num_engines must be >= 1, got {self.num_engines}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"engine.dtype={self.dtype!r} is not one of float32, bfloat16, float16")
        if self.num_threads < 0:
            raise ConfigError(f"engine.num_threads must be >= 0, got {self.num_threads}")
        if self.max_batch_size < 1:
            raise ConfigError(f"engine.max_batch_size must be >= 1, got {self.max_batch_size}")


def embedded_engine_args(engine: EngineConfig, seed: int, return_routed_experts: bool = False) -> list[str]:
    """Flags of one embedded engine server (`python -m miles.engines.embedded`) after --model-path/--host/--port."""
    args = ["--dtype", engine.dtype, "--max-batch-size", str(engine.max_batch_size), "--random-seed", str(seed),
            "--num-threads", str(engine.num_threads)]
    if return_routed_experts:
        args.append("--enable-return-routed-experts")
    return [*args, *engine.extra_args]


@dataclass(frozen=True)
class RouterConfig:
    """The HTTP router that spreads /generate over healthy engines."""

    host: str = "127.0.0.1"
    """Address the router binds to."""
    port: int = 29000
    """Router port (local executor); on Slurm it derives from the job id."""
    policy: str = "least_in_flight"
    """Worker choice: least_in_flight or round_robin."""
    health_check_interval_s: float = 2.0
    """Seconds between background /health probes of each engine."""
    health_check_failure_threshold: int = 2
    """Consecutive failed probes after which an engine is taken out of rotation."""
    max_retries: int = 3
    """Times a /generate is retried on another engine after a connection failure."""
    request_timeout_s: float = 3600.0
    """Seconds a proxied request may take before the router gives up on it."""

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise ConfigError(f"router.policy={self.policy!r} is not one of {ROUTER_POLICIES}")
        if self.health_check_failure_threshold < 1:
            raise ConfigError("router.health_check_failure_threshold must be >= 1")
        if self.max_retries < 0:
            raise ConfigError("router.max_retries must be >= 0")
