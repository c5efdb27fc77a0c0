"""The gateway application: routes synced from the store, admin endpoints, lifecycle.

Two listeners: the client one (OpenAI endpoints, `/health`, `/metrics` unless
`GATEWAY_METRICS_ON_CLIENT=false`; with `GATEWAY_API_KEYS` set, everything there but
`/health` needs a client key) and the admin one (`/admin/*` and `/metrics`, token-protected
when `GATEWAY_ADMIN_TOKEN` is set); the client listener never exposes an admin action.
Both listeners run on the gateway's own HTTP/1.1 server (`gateway.http`), for the client
listener's latency.
A gateway holds its routes in memory and reconciles them with the store every second
(and at once on `POST /admin/routes/refresh`, which the traffic activity calls after
writing a route). It heartbeats into the store so the traffic activity knows which
gateways must confirm a new generation. If the store is unreachable
it keeps serving the last routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ClientKeys, client_key_auth
from gateway.errors import error_response, server_error
from gateway.http import (
    AnyResponse,
    Handler,
    HttpServer,
    Middleware,
    Request,
    Response,
    Routes,
    json_response,
    with_middlewares,
)
from gateway.metrics import GatewayMetrics, UnrecordedMetrics
from gateway.proxy import UPSTREAM_CONNECT_TIMEOUT_S, UPSTREAM_READ_TIMEOUT_S, Proxy
from gateway.upstream import Upstreams
from gateway.workers import merge_metrics, sibling_metrics, worker_admin_port
from turnout import tracing
from turnout.config import ModelSwitchingConfig
from turnout.gateway_protocol import AdminState, ReplicaLoad, StatsResponse
from turnout.replicas import ReplicaBalancer
from turnout.store import Store
from turnout.transitions import TransitionManager

log = logging.getLogger("gateway")

RECONCILE_INTERVAL_S = 1.0
HEARTBEAT_INTERVAL_S = 2.0

def client_host(bind_host: str) -> str:
    """The address other processes use to reach a server bound to `bind_host`."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


class Gateway:
    """State and background loops of one gateway process."""

    def __init__(self, settings: ModelSwitchingConfig, store: Store, gateway_id: str,
                 admin_url: str | None = None, *, worker: int | None = None) -> None:
        self.settings = settings
        self.store = store
        self.gateway_id = gateway_id
        host = settings.gateway_advertise_host or client_host(settings.gateway_admin_host)
        # One of several workers on one port (`gateway.workers`): its own admin port, and
        # the admin listeners of the others, whose metrics `/metrics` adds to its own.
        self.admin_port = settings.gateway_admin_port if worker is None \
            else worker_admin_port(settings.gateway_admin_port, worker)
        self.admin_url = admin_url or f"http://{host}:{self.admin_port}"
        self.siblings = [] if worker is None else [
            f"http://{client_host(settings.gateway_admin_host)}:"
            f"{worker_admin_port(settings.gateway_admin_port, i)}"
            for i in range(settings.gateway_workers) if i != worker]
        self.sibling_client: httpx.AsyncClient | None = None
        self.transitions = TransitionManager(settings)
        self.table = self.transitions.table
        self.metrics = GatewayMetrics(retention_s=settings.gateway_stats_retention_s) \
            if settings.gateway_request_metrics else UnrecordedMetrics()
        # A version's replicas, and which of them take requests: fed by the reconcile
        # loop from the engines' states and their hosts' heartbeats.
        self.replicas = ReplicaBalancer(settings.engine_host_live_after_s)
        # Client requests traced only when asked for (a share) and tracing is on.
        self.tracer = tracing.tracer() if settings.gateway_trace_sample > 0 else None
        self.proxy = Proxy(self.transitions, self.metrics, settings.gateway_max_body_bytes,
                           mirror_max_inflight=settings.gateway_mirror_max_inflight,
                           replicas=self.replicas, traced=self.tracer is not None)
        self._reconcile_lock = asyncio.Lock()
        self._served_weights: dict[str, dict[str, float]] = {}  # per model, as applied
        self._tasks: list[asyncio.Task[None]] = []
        self._store_ok = True

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # Keep-alive connections to the engines, at most so many to each (shadow copies
        # included); see gateway.upstream for why not aiohttp's client.
        self.proxy.upstreams = Upstreams(
            max_per_host=self.settings.gateway_upstream_max_connections,
            connect_timeout_s=UPSTREAM_CONNECT_TIMEOUT_S,
            read_timeout_s=UPSTREAM_READ_TIMEOUT_S)
        try:
            await self.reconcile()
        except Exception as exc:
            log.warning("store unreachable at start, serving no routes until it answers: %r",
                        exc)
        if self.siblings:
            token = self.settings.gateway_admin_token
            self.sibling_client = httpx.AsyncClient(
                timeout=2.0, headers={"Authorization": f"Bearer {token}"} if token else {})
        self._tasks = [
            asyncio.create_task(self._every(RECONCILE_INTERVAL_S, self._reconcile_quietly),
                                name="gateway-reconcile"),
            asyncio.create_task(self._every(HEARTBEAT_INTERVAL_S, self._heartbeat),
                                name="gateway-heartbeat"),
        ]
        log.info("gateway %s started: %d routes, admin at %s", self.gateway_id,
                 len(self.table.routes), self.admin_url)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.proxy.stop_mirrors()  # before the session they use is closed
        try:
            await self.store.remove_gateway(self.gateway_id)
        except Exception as exc:
            log.warning("could not remove gateway %s from the store: %r", self.gateway_id, exc)
        if self.proxy.upstreams is not None:
            await self.proxy.upstreams.close()
            self.proxy.upstreams = None
        if self.sibling_client is not None:
            await self.sibling_client.aclose()
            self.sibling_client = None
        log.info("gateway %s stopped", self.gateway_id)

    async def _every(self, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await step()
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------ store sync

    async def reconcile(self, model_id: str | None = None) -> None:
        """Read routes, rules, aliases and model ids from the store; apply only newer routes.
        Then read the engines' states and their hosts' heartbeats (one query), and route
        each version only to its replicas on live hosts with ready engines.

        With `model_id` (a push after one model's route changed), read just that model's
        route, rules and engines: with hundreds of models, a full read on every push is
        the cost.
        """
        async with self._reconcile_lock:
            try:
                if model_id is None:
                    applied = await self.transitions.reconcile(self.store)
                else:
                    applied = await self.transitions.reconcile_model(self.store, model_id)
                # After the routes: any engine a route names was recorded before it.
                self.replicas.set_engines(
                    await self.store.engine_replicas(model_id=model_id), model_id=model_id)
            finally:  # with the held engine records if the store failed us
                for level, change in self.replicas.sync(self.table.routes.values()):
                    log.log(level, "%s", change)
            for route in applied:
                weights = route.weights()
                self.metrics.route_applied(route.model_id, route.generation, weights,
                                           self._served_weights.get(route.model_id, {}))
                self._served_weights[route.model_id] = weights
                log.info("applied route of %s generation %d: %s", route.model_id,
                         route.generation, route.weights())

    async def _reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except Exception as exc:
            if self._store_ok:  # one warning per outage, not one per second
                log.warning("store unreachable, serving the last known routes: %r", exc)
            self._store_ok = False
        else:
            if not self._store_ok:
                log.info("store reachable again")
            self._store_ok = True
        # With the routes held (the last known ones if the store is down): stats of
        # versions no route names any more go after the retention period. Older outcomes
        # are folded into histograms here, off the request path.
        self.metrics.forget_unrouted(self.table.routed_versions())
        self.metrics.fold()

    async def _heartbeat(self) -> None:
        try:
            await self.store.heartbeat_gateway(self.gateway_id, self.admin_url)
        except Exception as exc:
            log.debug("heartbeat failed: %r", exc)

    # ------------------------------------------------------------------ admin views

    def state(self) -> AdminState:
        return AdminState(
            gateway_id=self.gateway_id, generations=self.table.generations(),
            inflight=self.metrics.inflight_by_model(),
            replicas={model: {version: [ReplicaLoad.model_validate(r) for r in replicas]
                              for version, replicas in versions.items()}
                      for model, versions in self.replicas.inflight().items()})

    def stats(self, since: float | None = None, until: float | None = None, *,
              model_id: str | None = None, warmup_version: str | None = None,
              warmup_requests: int = 0) -> StatsResponse:
        return StatsResponse(gateway_id=self.gateway_id, stats=self.metrics.stats_by_model(
            since, until, model_id=model_id, warmup_version=warmup_version,
            warmup_requests=warmup_requests))


def _admin_auth(token: str | None) -> Middleware:
    """Require `Authorization: Bearer <token>` when a token is configured."""
    expected = f"Bearer {token}".encode() if token else None

    async def middleware(request: Request, handler: Handler) -> AnyResponse:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "a valid admin bearer token is required",
                                      type="authentication_error", code="invalid_admin_token")
        return await handler(request)

    return middleware


class Listener:
    """Routes inside middlewares (the first outermost), served by `gateway.http`."""

    def __init__(self, routes: Routes, middlewares: list[Middleware], *,
                 max_body_bytes: int) -> None:
        self.middlewares = middlewares
        self.handler = with_middlewares(routes, middlewares)
        self.max_body_bytes = max_body_bytes
        self.server: HttpServer | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        server = HttpServer(self.handler, error=server_error,
                            max_body_bytes=self.max_body_bytes)
        await server.start(host, port, reuse_port=reuse_port)
        self.server = server

    async def stop(self) -> None:
        """Stop listening; in-flight requests finish first (see `HttpServer.stop`)."""
        if self.server is not None:
            await self.server.stop()
            self.server = None


class ClientApp(Listener):
    """The client listener (the OpenAI endpoints, `/health`, `/metrics`) and the `Gateway`
    they serve, which starts before the listener opens and stops after it closed."""

    def __init__(self, gateway: Gateway, routes: Routes,
                 middlewares: list[Middleware]) -> None:
        super().__init__(routes, middlewares,
                         max_body_bytes=gateway.settings.gateway_max_body_bytes)
        self.gateway = gateway

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        await self.gateway.start()
        try:
            await super().start(host, port, reuse_port=reuse_port)
        except BaseException:
            await self.gateway.stop()
            raise

    async def stop(self) -> None:
        await super().stop()
        await self.gateway.stop()


def create_app(settings: ModelSwitchingConfig, store: Store, gateway_id: str,
               admin_url: str | None = None, *,
               worker: int | None = None) -> ClientApp:
    """The client-facing gateway; the caller owns `store` and closes it after the app.

    Its `Gateway` (`gateway_of(app)`) starts and stops with it. Serve the admin endpoints
    with `create_admin_app` (or run both with `start_gateway`). A client that goes away
    cancels its request's handler, so the engine call is closed too.
    """
    gateway = Gateway(settings, store, gateway_id, admin_url, worker=worker)
    keys = ClientKeys(settings.gateway_api_keys)
    # Without keys no middleware is added: the request path is as it was.
    middlewares: list[Middleware] = [client_key_auth(keys, gateway.metrics)] if keys else []
    if gateway.tracer is not None:
        from gateway.tracing import traced_requests

        middlewares.insert(0, traced_requests(gateway.tracer,
                                              settings.gateway_trace_sample))
    routes = Routes(server_error)

    async def health(_: Request) -> Response:
        return json_response({"status": "ok"})

    routes.add("GET", "/health", health)
    if settings.gateway_metrics_on_client:
        routes.add("GET", "/metrics", _metrics_handler(gateway))
    routes.add("GET", "/v1/models", gateway.proxy.list_models)
    routes.add("POST", "/v1/completions", gateway.proxy.completions)
    routes.add("POST", "/v1/chat/completions", gateway.proxy.chat_completions)
    return ClientApp(gateway, routes, middlewares)


# Admin calls carry no body (a refresh names its model in the query).
ADMIN_MAX_BODY_BYTES = 64 * 1024


def create_admin_app(gateway: Gateway, token: str | None) -> Listener:
    """The admin endpoints of `gateway`: state, windowed stats, route refresh, metrics."""
    middlewares = [_admin_auth(token)]
    tracer = tracing.tracer()
    if tracer is not None:
        from gateway.tracing import traced_requests

        middlewares.insert(0, traced_requests(tracer, 1.0))  # every admin call

    async def admin_state(_: Request) -> Response:
        return _json(gateway.state())

    async def admin_stats(request: Request) -> Response:
        query = request.query()
        bounds: dict[str, float | None] = {}
        for name in ("since", "until"):
            raw = query.get(name)
            try:
                value = None if raw in (None, "") else float(raw)
            except ValueError:
                value = math.nan
            if value is not None and not math.isfinite(value):
                return error_response(400, f"{name} must be unix seconds, got {raw!r}",
                                      type="invalid_request_error", param=name,
                                      code="invalid_window")
            bounds[name] = value
        raw_warmup = query.get("warmup_requests", "0")
        if not raw_warmup.isdigit() or int(raw_warmup) > 1_000_000:
            return error_response(400, f"warmup_requests must be a count, got {raw_warmup!r}",
                                  type="invalid_request_error", param="warmup_requests",
                                  code="invalid_window")
        return _json(gateway.stats(bounds["since"], bounds["until"],
                                   model_id=query.get("model_id"),
                                   warmup_version=query.get("warmup_version"),
                                   warmup_requests=int(raw_warmup)))

    async def admin_refresh(request: Request) -> Response:
        try:
            await gateway.reconcile(request.query().get("model_id"))
        except Exception as exc:
            log.warning("refresh failed, store unreachable: %r", exc)
            return error_response(503, "the store is unreachable; serving the last routes",
                                  type="service_unavailable", code="store_unreachable")
        return _json(gateway.state())

    routes = Routes(server_error)
    routes.add("GET", "/admin/state", admin_state)
    routes.add("GET", "/admin/stats", admin_stats)
    routes.add("POST", "/admin/routes/refresh", admin_refresh)
    routes.add("GET", "/metrics", _metrics_handler(gateway))
    routes.add("GET", "/admin/metrics/local", _metrics_handler(gateway, local=True))
    return Listener(routes, middlewares, max_body_bytes=ADMIN_MAX_BODY_BYTES)


def _json(model: AdminState | StatsResponse) -> Response:
    """An admin answer: the protocol model as JSON (`turnout.gateway_protocol`); stats
    leave out what they do not have (no window unless asked, no quantile of nothing)."""
    text = model.model_dump_json(exclude_none=isinstance(model, StatsResponse))
    return Response(text.encode(), 200, {"Content-Type": "application/json"})


async def _metrics_text(gateway: Gateway, *, local: bool = False) -> bytes:
    """`/metrics`: this gateway's, summed with its sibling workers' unless `local`."""
    body = generate_latest(gateway.metrics.registry)
    if not local and gateway.siblings and gateway.sibling_client is not None:
        others = await sibling_metrics(gateway.sibling_client, gateway.siblings)
        body = merge_metrics([body.decode(), *others]).encode()
    return body


def _metrics_handler(gateway: Gateway, *, local: bool = False) -> Handler:
    """`/metrics`: this gateway's, summed with its sibling workers' unless `local`."""
    async def metrics(_: Request) -> Response:
        return Response(await _metrics_text(gateway, local=local), 200,
                        {"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


def gateway_of(app: ClientApp) -> Gateway:
    return app.gateway


class AdminBindError(ValueError):
    """The admin listener would be reachable from other hosts without a token."""


@dataclass
class RunningGateway:
    gateway: Gateway
    client: ClientApp
    admin: Listener
    client_url: str
    admin_url: str

    async def stop(self) -> None:
        await self.admin.stop()
        await self.client.stop()  # stops the gateway's loops and leaves the store


async def start_gateway(settings: ModelSwitchingConfig, store: Store,
                        gateway_id: str, *, worker: int | None = None) -> RunningGateway:
    """Serve a gateway: client app on `gateway_host:gateway_port`, admin app on
    `gateway_admin_host:gateway_admin_port`. `worker` i of several (`gateway.workers`):
    the client port shared, the admin app on `gateway_admin_port + i`."""
    if not settings.gateway_admin_token and not _loopback(settings.gateway_admin_host):
        raise AdminBindError(
            f"refusing to serve admin endpoints on {settings.gateway_admin_host} without "
            "VLLM_MODEL_SWITCHING_GATEWAY_ADMIN_TOKEN: set a token or bind them to 127.0.0.1")
    app = create_app(settings, store, gateway_id, worker=worker)
    admin = create_admin_app(gateway_of(app), settings.gateway_admin_token)
    await admin.start(settings.gateway_admin_host, gateway_of(app).admin_port)
    try:
        # Workers share the client port (SO_REUSEPORT), see gateway.workers.
        await app.start(settings.gateway_host, settings.gateway_port,
                        reuse_port=worker is not None)
    except BaseException:
        await admin.stop()
        raise
    gateway = gateway_of(app)
    return RunningGateway(
        gateway, app, admin,
        f"http://{client_host(settings.gateway_host)}:{settings.gateway_port}",
        gateway.admin_url)


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
