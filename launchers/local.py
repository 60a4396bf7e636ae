"""The local executor: het-group 0 (engines + router) as local processes, same contract as on Slurm.

    with LocalRollout(cfg, run_dir) as rollout:
        rollout.router_url   # http://127.0.0.1:<router.port>
        rollout.engine_urls  # one per engine

Engines listen on engine.base_port + i and the router on router.port (from the config). Each server
logs to run_dir/logs/<name>.log. Everything started here is stopped by PID on exit, also when
start-up fails half-way (nothing is left running).
"""

import logging
from pathlib import Path

from miles.config.run_config import RunConfig
from miles.engines.config import embedded_engine_args
from miles.engines.process import ServerProcess, launch_embedded_engine, launch_router
from miles.engines.sglang import SGLangConfig, launch_local_sglang_engines
from miles.errors import ConfigError

logger = logging.getLogger(__name__)


class LocalRollout:
    """Starts `engine.num_engines` engines (embedded, or SGLang servers on GPUs sglang.first_gpu + i *
    sglang.tp_size) and the router; stops them on exit."""

    def __init__(self, cfg: RunConfig, run_dir: Path, sglang: SGLangConfig | None = None):
        if not Path(cfg.model.path, "config.json").is_file():
            raise ConfigError(
                f"model.path={cfg.model.path!r} holds no config.json; build a tiny model with "
                f"`python tools/make_tiny_model.py {cfg.model.path}` or point model.path at a HF checkpoint"
            )
        self.cfg = cfg
        self.sglang = sglang or getattr(cfg, "sglang", None) or SGLangConfig()
        self.log_dir = Path(run_dir) / "logs"
        self.engines: list[ServerProcess] = []
        self.router: ServerProcess | None = None

    @property
    def engine_urls(self) -> list[str]:
        return [e.url for e in self.engines]

    @property
    def trainer_address(self) -> str:
        """Where the engines reach the trainer (same machine)."""
        return "127.0.0.1"

    @property
    def router_url(self) -> str:
        assert self.router is not None, "LocalRollout used outside its `with` block"
        return self.router.url

    def __enter__(self) -> "LocalRollout":
        eng = self.cfg.engine
        try:
            if eng.kind == "sglang":  # launched, health-checked and version-probed by miles.engines.sglang
                launch_local_sglang_engines(self.cfg.model.path, eng, self.sglang, self.cfg.run.seed, self.log_dir,
                                            started=self.engines)
            else:
                for i in range(eng.num_engines):
                    port = eng.base_port + i
                    args = embedded_engine_args(eng, self.cfg.run.seed + i, self.cfg.r3.enabled)
                    self.engines.append(launch_embedded_engine(self.cfg.model.path, eng.host, port,
                                                               self.log_dir / f"engine{i}.log", args))
                for engine in self.engines:
                    engine.wait_healthy(eng.startup_timeout_s)
            rc = self.cfg.router
            self.router = launch_router(rc.host, rc.port, self.engine_urls, self.log_dir / "router.log", rc)
            self.router.wait_healthy(30.0, path="/readiness")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in [self.router, *self.engines]:
            if proc is not None:
                proc.stop()
        self.router, self.engines = None, []
