"""`EngineClient`: the one HTTP client for SGLang-API servers (real SGLang, the embedded engine, or our router).

Every method maps to one endpoint of SGLang's native API (docs/engine-api.md). Errors are raised
as `EngineError` naming the URL, endpoint and the server's answer; transport failures
(connection refused or reset) are `EngineUnreachable`, so callers can retry elsewhere.
"""

from typing import Any

import aiohttp


class EngineError(RuntimeError):
    """The engine answered with an error status."""

    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"{url} answered HTTP {status}: {body[:500]}")
        self.url, self.status, self.body = url, status, body


class EngineUnreachable(ConnectionError):
    """The engine could not be reached (refused, reset, timed out)."""


class EngineClient:
    """Async client of one server. Use as `async with EngineClient(url) as c: await c.generate(...)`."""

    def __init__(self, base_url: str, timeout_s: float = 3600.0, session: aiohttp.ClientSession | None = None):
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> "EngineClient":
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, payload: Any = None) -> Any:
        """Send one request; return the decoded JSON (or text, for plain-text endpoints)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = self.base_url + path
        try:
            async with self._session.request(method, url, json=payload) as resp:
                body = await resp.text()
                if resp.status >= 400:
                    raise EngineError(url, resp.status, body)
                if resp.content_type == "application/json" and body:
                    return await resp.json(content_type=None)
                return body
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise EngineUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc

    # -- generation -------------------------------------------------------------------------
    async def generate(self, payload: dict) -> dict | list[dict]:
        """POST /generate with a SGLang GenerateReqInput body."""
        return await self.request("POST", "/generate", payload)

    # -- health and info --------------------------------------------------------------------
    async def health(self) -> bool:
        try:
            await self.request("GET", "/health")
            return True
        except (EngineError, EngineUnreachable):
            return False

    async def health_generate(self) -> None:
        await self.request("GET", "/health_generate")

    async def model_info(self) -> dict:
        return await self.request("GET", "/model_info")

    async def server_info(self) -> dict:
        return await self.request("GET", "/server_info")

    # -- cache, abort, pause ----------------------------------------------------------------
    async def flush_cache(self) -> str:
        return await self.request("POST", "/flush_cache")

    async def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        await self.request("POST", "/abort_request", {"rid": rid, "abort_all": abort_all})

    async def pause_generation(self, mode: str = "abort") -> dict:
        return await self.request("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> dict:
        return await self.request("POST", "/continue_generation", {"torch_empty_cache": True})

    async def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return await self.request("POST", "/release_memory_occupation", {"tags": tags})

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return await self.request("POST", "/resume_memory_occupation", {"tags": tags})

    # -- weight sync -------------------------------------------------------------------------
    async def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> dict:
        return await self._checked("/update_weights_from_disk", {"model_path": model_path, "weight_version": weight_version})

    async def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = "weight_update_group", backend: str = "nccl",
    ) -> dict:
        return await self._checked("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend,
        })

    async def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]],
        group_name: str = "weight_update_group", weight_version: str | None = None, flush_cache: bool = True,
    ) -> dict:
        return await self._checked("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "weight_version": weight_version, "flush_cache": flush_cache,
        })

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict:
        return await self._checked("/destroy_weights_update_group", {"group_name": group_name})

    async def _checked(self, path: str, payload: dict) -> dict:
        """Weight endpoints answer {"success": bool, "message": str}; raise unless success."""
        answer = await self.request("POST", path, payload)
        if not answer.get("success", False):
            raise EngineError(self.base_url + path, 200, str(answer.get("message")))
        return answer
