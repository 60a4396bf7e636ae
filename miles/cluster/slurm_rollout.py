"""The controller's view of het-group 0: attach to the engines and router that Slurm started.

    with SlurmRollout(cfg, run_dir) as rollout:   # same interface as launchers/local.py's LocalRollout
        rollout.router_url, rollout.engine_urls, rollout.trainer_address

Nothing is started or stopped here: the engine and router steps belong to the batch script, which
ends them when the train step finishes (sbatch/miles-het.sbatch). Entering waits until every
engine and the router have published their address (cluster.rendezvous_timeout_s), then until
every engine answers /health and the router /readiness (engine.startup_timeout_s).
`miles.driver._rollout_group` picks this class when `in_het_job()`.
"""

import logging
import os
import time
import urllib.request
from pathlib import Path

from miles.cluster.rendezvous import ROUTER, Rendezvous, engine_name
from miles.cluster.slurm_env import SlurmEnv
from miles.engines.process import probe_http

logger = logging.getLogger(__name__)

ROLE_ENV = "MILES_ROLE"
"""Set by `python -m miles.launchers.role` to the task's role (engine, router, trainer)."""


def in_het_job() -> bool:
    """Whether this process is a trainer task of a Miles het job (started by launchers/role.py)."""
    return os.environ.get(ROLE_ENV) == "trainer" and SlurmEnv().in_job


class EndpointNotReady(RuntimeError):
    """An engine or the router did not answer its health endpoint in time."""


def wait_http_ok(url: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll GET url until it answers 200; EndpointNotReady with the last error after timeout_s."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # cluster-internal: never a proxy
    deadline = time.monotonic() + timeout_s
    while True:
        last = probe_http(opener, url)
        if last is None:
            return
        if time.monotonic() >= deadline:
            raise EndpointNotReady(f"{url} not ready after {timeout_s:.0f} s (last: {last})")
        time.sleep(poll_s)


class SlurmRollout:
    """Engines + router of het-group 0, found through the rendezvous files."""

    def __init__(self, cfg, run_dir: str | os.PathLike, slurm: SlurmEnv | None = None):
        self.cfg = cfg
        self.slurm = slurm or SlurmEnv()
        self.rendezvous = Rendezvous(Path(run_dir), self.slurm.job_id, self.slurm.restart_count)
        self._engine_urls: list[str] = []
        self._router_url: str | None = None

    @property
    def engine_urls(self) -> list[str]:
        return list(self._engine_urls)

    @property
    def router_url(self) -> str:
        assert self._router_url is not None, "SlurmRollout used outside its `with` block"
        return self._router_url

    @property
    def trainer_address(self) -> str:
        """This node's address as the engines reach it (the weight-sync group's master address)."""
        return self.slurm.node_addr()

    def __enter__(self) -> "SlurmRollout":
        names = [engine_name(i) for i in range(self.cfg.engine.num_engines)] + [ROUTER]
        start = time.monotonic()
        addrs = self.rendezvous.wait_for(names, self.cfg.cluster.rendezvous_timeout_s)
        self._engine_urls = [addrs[n].url for n in names[:-1]]
        self._router_url = addrs[ROUTER].url
        logger.info("rendezvous complete after %.1f s: router %s, engines %s",
                    time.monotonic() - start, self._router_url, ", ".join(self._engine_urls))
        deadline = time.monotonic() + self.cfg.engine.startup_timeout_s
        for url in self._engine_urls:
            wait_http_ok(url + "/health", max(deadline - time.monotonic(), 1.0))
        wait_http_ok(self._router_url + "/readiness", max(deadline - time.monotonic(), 1.0))
        logger.info("engines and router ready after %.1f s", time.monotonic() - start)
        return self

    def __exit__(self, *exc) -> None:
        """Nothing to stop: the batch script owns the engine and router steps."""
