"""`TransitionManager`: which version serves one request, from the route and the rules.

The routing core of the gateway, and a library class for in-process use (the guide's
`SwitchingEngine` calls `handle_request_routing(model_id, request.id)`): both answer with
the same code from the same state, the routes the switch workflows write and the routing
rules operators set, both read from the store.

The gateway feeds its manager from its own reconcile loop. Used on its own, a manager
keeps itself in sync from the store named by the settings (`VLLM_MODEL_SWITCHING_DATABASE_URL`)
in a background thread, so it also works in synchronous code such as `vllm.LLM`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from turnout.domain import Backend, Route
from turnout.routing import RouteTable, pick_from
from turnout.rules import RoutingRules, request_features

if TYPE_CHECKING:
    from turnout.config import ModelSwitchingConfig
    from turnout.store import Store

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 1.0
FIRST_SYNC_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Choice:
    """The backend that serves a request, and the rule that chose it (None: the split)."""

    backend: Backend
    rule: str | None = None


class TransitionManager:
    def __init__(self, settings: ModelSwitchingConfig | None = None, *,
                 sync_interval_s: float = SYNC_INTERVAL_S) -> None:
        self.table = RouteTable()
        self.rules: dict[str, RoutingRules] = {}
        # Each model's live version: the stable side of a rollout, where failures fail over.
        self.stable: dict[str, str] = {}
        self._settings = settings
        self._sync_interval_s = sync_interval_s
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state

    def set_route(self, route: Route) -> bool:
        """Apply a route if newer than the one held (see `RouteTable.apply`). A manager fed
        by hand does not sync from the store."""
        self._synced.set()
        return self.table.apply(route)

    def set_rules(self, model_id: str, rules: RoutingRules | None) -> None:
        self._synced.set()
        if rules and rules.rules:
            self.rules[model_id] = rules
        else:
            self.rules.pop(model_id, None)

    async def reconcile(self, store: Store) -> list[Route]:
        """Read routes, rules, aliases and model ids from the store; return the routes that
        were newer than the ones held. A failure leaves the held state untouched."""
        routes = await store.list_routes()
        rules = await store.list_rules()
        aliases = await store.aliases()
        live = await store.live_versions()
        applied = self.table.apply_all(routes)
        self.rules = dict(rules)
        self.stable = {model_id: v for model_id, v in live.items() if v is not None}
        self.table.set_aliases(aliases)
        self.table.set_known_models(live)
        self._synced.set()
        return applied

    async def reconcile_model(self, store: Store, model_id: str) -> list[Route]:
        """Read one model's route and rules (a push for that model); the rest waits for the
        next full `reconcile`."""
        route = await store.get_route(model_id)
        rules = await store.list_rules(model_id)
        applied = [route] if route is not None and self.table.apply(route) else []
        self.set_rules(model_id, rules.get(model_id))
        return applied

    # ------------------------------------------------------------------ decisions

    def choose(self, model_id: str, *, body: Mapping[str, Any] | None = None,
               headers: Mapping[str, str] | None = None, user_key: str | None = None,
               rand: float | None = None) -> Choice | None:
        """The backend for one request of `model_id`, or None when nothing serves it.

        Rules are looked at first (only those whose version is in the route); otherwise the
        weighted split, sticky by `user_key` when one is given.
        """
        backends = self.table.live.get(model_id)
        if not backends:
            return None
        rules = self.rules.get(model_id)
        if rules is not None and body is not None:
            served = {b.version: b for b in backends}
            rule = rules.first_match(request_features(body, headers), served)
            if rule is not None:
                return Choice(served[rule.version], rule.name or f"#{rules.rules.index(rule)}")
        backend = pick_from(model_id, backends, user_key,
                            random.random() if rand is None else rand)
        return Choice(backend) if backend is not None else None

    def fallback(self, model_id: str, failed_version: str) -> Backend | None:
        """Where to retry a request that `failed_version` failed before its first byte: the
        stable (live) version, if it is in the route and is not the one that failed."""
        stable = self.stable.get(model_id)
        if stable is None or stable == failed_version:
            return None
        return next((b for b in self.table.live.get(model_id, []) if b.version == stable),
                    None)

    def handle_request_routing(self, model_id: str, request_id: str,
                               request: Mapping[str, Any] | None = None) -> str | None:
        """The version that must serve this request while a transition is under way.

        None when there is nothing to decide — the model has a single version serving and no
        rule sends the request elsewhere — so the caller uses its normal routing. The request
        id is the sticky key: the same id always gets the same answer while weights stay put.
        `request` (an OpenAI request body), when given, lets routing rules apply.
        """
        self._ensure_synced()
        choice = self.choose(model_id, body=request, user_key=request_id)
        if choice is None or (choice.rule is None and len(self.table.live[model_id]) < 2):
            return None
        return choice.backend.version

    # ------------------------------------------------------------------ standalone sync

    def _ensure_synced(self) -> None:
        """On first use without a feeder (no gateway loop), start syncing from the store."""
        if self._synced.is_set():
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._sync_forever,
                                                name="turnout-transitions", daemon=True)
                self._thread.start()
        if not self._synced.wait(FIRST_SYNC_TIMEOUT_S):
            log.warning("no routes from the store after %gs; routing as if no transition",
                        FIRST_SYNC_TIMEOUT_S)

    def _sync_forever(self) -> None:
        asyncio.run(self._sync_loop())

    async def _sync_loop(self) -> None:
        from turnout.config import ModelSwitchingConfig
        from turnout.store import Store

        settings = self._settings or ModelSwitchingConfig.from_env()
        store = Store.from_url(settings.database_url)
        healthy = True
        try:
            while not self._stop.is_set():
                try:
                    await self.reconcile(store)
                    healthy = True
                except Exception as exc:  # keep the last routes; say so once per outage
                    if healthy:
                        log.warning("store unreachable, keeping the last routes: %r", exc)
                    healthy = False
                await asyncio.sleep(self._sync_interval_s)
        finally:
            await store.close()

    def close(self) -> None:
        """Stop the background sync, if one runs."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
