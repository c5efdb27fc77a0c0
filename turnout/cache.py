"""The guide's `ModelCache`: the stack's engines, seen and steered from a client.

In this architecture the cache is not in this process: the stack's engines are the cache.
Each engine host keeps the engines nothing serves (the version a switch replaced, standing
by for a rollback; versions preloaded ahead of a switch) up to `max_cached_models` and its
memory, evicting the lowest priority, then the least recently used. This class is a view
of that fleet (`GET /engines`), refreshed in the background, and the guide's
`preload_model`, which asks the stack to load a version without traffic
(`POST /models/{model_id}/versions/{version}/preload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from turnout.config import ModelSwitchingConfig
from turnout.domain import ModelInfo
from turnout.fleet import CACHED_ROLES, EngineRole, FleetReport
from turnout.sdk import TurnoutAPIError, _Client

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 10.0
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CacheEntry:
    """One version the stack holds loaded: its `role` (serving, candidate, shadow,
    standby, preloaded, idle), on how many hosts, with what eviction priority."""

    model_id: str
    version: str
    role: str
    engines: int = 0
    priority: int = 0
    memory_bytes: int = 0

    @property
    def key(self) -> str:
        """The guide's cache key, `f"{model_id}_{version}"` (as in `"my_model_v2.0"`)."""
        return f"{self.model_id}_{self.version}"

    @property
    def cached(self) -> bool:
        """Loaded but serving nothing: what the cache's limit counts."""
        return EngineRole(self.role) in CACHED_ROLES


class ModelCache:
    """The stack's loaded versions, and preloading.

    `max_cache_size` is kept for the guide's constructor; the limit the stack applies is
    each engine host's `max_cached_models`, reported per host by `stats()`.
    """

    def __init__(self, max_cache_size: int = 5, *, api_url: str | None = None,
                 api_key: str | None = None, settings: ModelSwitchingConfig | None = None,
                 refresh_interval_s: float = DEFAULT_REFRESH_S) -> None:
        self._client = _Client(api_url, api_key,
                               settings.model_dump() if settings is not None else {})
        self.max_cache_size = max_cache_size
        self.refresh_interval_s = refresh_interval_s
        self._entries: dict[str, CacheEntry] = {}
        self._report = FleetReport()
        self._registered = 0
        self._refreshed_at: float | None = None
        self._refreshes = 0
        self._failures = 0
        self._problem: str | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the guide's calls

    def preload_model(self, key: str, priority: int = 0, *,
                      requested_by: str | None = None) -> dict[str, Any]:
        """Load the version named by the guide's key (`f"{model_id}_{version}"`) without
        traffic, so a later switch to it needs no cold start; returns the preload's status
        (`phase` `loading`, or `ready` when it was loaded already). Cached engines of a
        lower `priority` may be evicted to make room; raises `TurnoutAPIError` (409) when
        it cannot fit, naming what would have to go."""
        return self.preload(*self._resolve(key), priority=priority,
                            requested_by=requested_by)

    def release_model(self, key: str, *, requested_by: str | None = None) -> dict[str, Any]:
        """Let go of a preload: its engines stop unless something else holds them."""
        return self.release(*self._resolve(key), requested_by=requested_by)

    def preload(self, model_id: str, version: str, *, priority: int = 0,
                requested_by: str | None = None) -> dict[str, Any]:
        """`preload_model` by model id and version."""
        return self._client.obj(
            "POST", f"/models/{model_id}/versions/{version}/preload",
            json={"priority": priority, "requested_by": requested_by})

    def release(self, model_id: str, version: str, *,
                requested_by: str | None = None) -> dict[str, Any]:
        return self._client.obj("DELETE", f"/models/{model_id}/versions/{version}/preload",
                                json={"requested_by": requested_by})

    def preload_status(self, model_id: str, version: str) -> dict[str, Any]:
        return self._client.obj("GET", f"/models/{model_id}/versions/{version}/preload")

    def fleet(self) -> dict[str, Any]:
        """`GET /engines`: hosts with capacity and free memory, every engine with its role."""
        return self._client.obj("GET", "/engines")

    def loaded(self) -> list[str]:
        """Keys of the versions with a ready engine, as last read."""
        return sorted(self._entries)

    def entries(self) -> list[CacheEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def is_loaded(self, model_id: str, version: str) -> bool:
        return f"{model_id}_{version}" in self._entries

    def stats(self) -> dict[str, Any]:
        hosts = [{"host_id": h.host_id, "live": h.live, "engines": h.engines,
                  "cached": h.cached, "max_cached_models": h.capacity.max_cached_models,
                  "memory_bytes": h.capacity.memory_bytes, "free_bytes": h.free_bytes}
                 for h in self._report.hosts]
        return {
            "max_cache_size": self.max_cache_size,
            "loaded": len(self._entries),
            "cached": sum(e.cached for e in self._entries.values()),
            "registered_versions": self._registered,
            "hosts": hosts,
            "entries": [asdict(e) for e in self.entries()],
            "refreshed_at": self._refreshed_at,
            "refreshes": self._refreshes,
            "refresh_failures": self._failures,
            "api_reachable": self._problem is None and self._refreshed_at is not None,
            "background": self._task is not None and not self._task.done(),
        }

    # ------------------------------------------------------------------ the view

    async def refresh(self) -> list[CacheEntry]:
        """Read the stack's fleet now; raises if the API cannot be reached."""
        report = FleetReport.model_validate(
            await self._client.arequest("GET", "/engines", timeout=REQUEST_TIMEOUT_S))
        models = await self._client.arequest("GET", "/models", timeout=REQUEST_TIMEOUT_S)
        entries: dict[str, CacheEntry] = {}
        for engine in report.engines:
            if engine.state != "ready":
                continue
            key = f"{engine.model_id}_{engine.version}"
            seen = entries.get(key)
            entries[key] = CacheEntry(
                engine.model_id, engine.version, engine.role.value,
                (seen.engines if seen else 0) + 1, engine.priority,
                (seen.memory_bytes if seen else 0) + engine.memory_bytes)
        self._entries = entries
        self._report = report
        self._registered = sum(len(m["versions"]) for m in models)
        self._refreshed_at = time.time()
        self._refreshes += 1
        return self.entries()

    async def start_background_tasks(self) -> None:
        """Refresh every `refresh_interval_s` (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="turnout-model-cache")

    async def stop_background_tasks(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _resolve(self, key: str) -> tuple[str, str]:
        """(model id, version) of a guide key: model ids contain underscores, so the key
        is matched against the registered versions rather than split."""
        models = [ModelInfo.model_validate(m) for m in self._client.request("GET", "/models")]
        matches = [(m.model_id, v.version) for m in models for v in m.versions
                   if f"{m.model_id}_{v.version}" == key]
        if len(matches) != 1:
            raise KeyError(f"{key!r} names no registered version (keys are "
                           f"'<model_id>_<version>')" if not matches
                           else f"{key!r} is ambiguous: {matches}")
        return matches[0]

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except (httpx.TransportError, TurnoutAPIError) as exc:
                self._failures += 1
                problem = f"HTTP {exc.status_code}" if isinstance(exc, TurnoutAPIError) \
                    else type(exc).__name__
                if self._problem is None:
                    log.warning("model cache view not refreshed: the turnout API at %s "
                                "failed (%s); keeping the last view", self._client.api_url,
                                problem)
                self._problem = problem
            except Exception:  # noqa: BLE001 - an odd answer must not end the refreshes
                self._failures += 1
                log.exception("model cache view not refreshed; keeping the last view")
            else:
                if self._problem is not None:
                    log.info("model cache view refreshed again from %s",
                             self._client.api_url)
                self._problem = None
            await asyncio.sleep(self.refresh_interval_s)
