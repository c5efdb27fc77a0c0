"""The guide's `ModelCache`: a read-only view of which versions the stack holds ready.

In this architecture the cache is not in this process: the stack's engines are the cache.
An engine worker on each serving host starts, keeps warm and stops the vLLM servers, and
the store records them. This class only keeps an up-to-date view for code that asks
"what is loaded?", refreshed in the background from the REST API:

- `GET /health/models` (preferred) lists, per model, the versions the stack's monitor looks
  at: the live one, those a rollout routes traffic to, and those with a ready engine
  (role `cached`), with their engines' resources. That is what is loaded or serving.
- Where that endpoint is missing or fails, `GET /models` still tells each model's live
  version, which is always served: the view then holds only live versions and `stats()`
  says so (`source: "live_versions"`).

The monitor writes its look once per monitoring interval, so the view can lag an engine
start or stop by that long. There is no `preload_model`: the API has no call that loads a
version without switching to it, and pretending to preload would mislead the caller.
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
from turnout.monitoring import ModelHealth
from turnout.sdk import TurnoutAPIError, _Client

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 10.0
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CacheEntry:
    """One version the stack holds: `role` is live, candidate or cached (ready engine, no
    traffic); `engines` counts the engines the monitor saw for it (0 for an external
    endpoint, which someone else runs)."""

    model_id: str
    version: str
    role: str
    engines: int = 0

    @property
    def key(self) -> str:
        """The guide's cache key, `f"{model_id}_{version}"` (as in `"my_model_v2.0"`)."""
        return f"{self.model_id}_{self.version}"


class ModelCache:
    """Which versions have a ready engine (or serve traffic), refreshed in the background.

    `max_cache_size` is kept for the guide's constructor and reported by `stats()`; the
    limit the stack applies is the engine workers' `max_cached_models` setting, which
    this client cannot change.
    """

    def __init__(self, max_cache_size: int = 5, *, api_url: str | None = None,
                 api_key: str | None = None, settings: ModelSwitchingConfig | None = None,
                 refresh_interval_s: float = DEFAULT_REFRESH_S) -> None:
        self._client = _Client(api_url, api_key,
                               settings.model_dump() if settings is not None else {})
        self.max_cache_size = max_cache_size
        self.refresh_interval_s = refresh_interval_s
        self._entries: dict[str, CacheEntry] = {}
        self._registered = 0
        self._source = "none"
        self._refreshed_at: float | None = None
        self._refreshes = 0
        self._failures = 0
        self._problem: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> list[CacheEntry]:
        """Read the stack's view now; raises if the API cannot be reached."""
        models = [ModelInfo.model_validate(m) for m in await self._client.arequest(
            "GET", "/models", timeout=REQUEST_TIMEOUT_S)]
        try:
            report = await self._client.arequest("GET", "/health/models",
                                                 timeout=REQUEST_TIMEOUT_S)
            health = [ModelHealth.model_validate(m) for m in report["models"]]
        except TurnoutAPIError as exc:
            log.debug("GET /health/models failed (HTTP %d): live versions only",
                      exc.status_code)
            entries = [CacheEntry(m.model_id, m.live_version, "live")
                       for m in models if m.live_version]
            source = "live_versions"
        else:
            entries = [CacheEntry(m.model_id, v.version, v.role, len(v.engines))
                       for m in health for v in m.versions]
            source = "health"
        self._entries = {e.key: e for e in entries}
        self._registered = sum(len(m.versions) for m in models)
        self._source = source
        self._refreshed_at = time.time()
        self._refreshes += 1
        return entries

    def loaded(self) -> list[str]:
        """Keys (`f"{model_id}_{version}"`) of the versions held ready, as last read."""
        return sorted(self._entries)

    def entries(self) -> list[CacheEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def is_loaded(self, model_id: str, version: str) -> bool:
        return f"{model_id}_{version}" in self._entries

    def stats(self) -> dict[str, Any]:
        return {
            "max_cache_size": self.max_cache_size,
            "loaded": len(self._entries),
            "registered_versions": self._registered,
            "entries": [asdict(e) for e in self.entries()],
            "source": self._source,
            "refreshed_at": self._refreshed_at,
            "refreshes": self._refreshes,
            "refresh_failures": self._failures,
            "api_reachable": self._problem is None and self._refreshed_at is not None,
            "background": self._task is not None and not self._task.done(),
        }

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
