"""The OpenAI-compatible data path: pick a version, then one of its replicas (the one with
the fewest requests in flight, see `turnout.replicas`), forward, stream the answer back.

The request path touches only memory (route table, replica sets, metrics) and the shared
keep-alive connections to engines (`gateway.upstream`): no store access and no INFO
logging per request, so the gateway adds little latency and keeps serving when the store
is down.

Traffic mirroring: when a model's route has a shadow backend, a share of its requests is
also copied to the shadow in a background task. The copy is measured under the shadow's
version like any request (so stats windows, health verdicts and draining see it) and its
answer is read to the end and dropped; the client never waits for it, never sees it, and
a client leaving does not cancel it. A model without a shadow pays one dict lookup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from typing import Any

import aiohttp
from yarl import URL

from gateway.errors import error_response
from gateway.http import BodyTooLarge, Request, Response, StreamResponse, json_response
from gateway.metrics import GatewayMetrics
from gateway.upstream import Answer, Upstreams
from turnout import tracing
from turnout.domain import Backend
from turnout.endpoints import bearer_header
from turnout.replicas import ReplicaBalancer, ReplicaSet, ReplicaSlot
from turnout.transitions import TransitionManager

log = logging.getLogger("gateway.proxy")

VERSION_HEADER = "X-Turnout-Version"
# Where a traced request's model id is left for its span (`gateway.tracing`), in
# `Request.state`.
MODEL_KEY = "turnout_model_id"
USER_HEADER = "X-Turnout-User"
# No total timeout: a long generation is legitimate. A stalled engine is cut after this long
# without a single byte.
UPSTREAM_CONNECT_TIMEOUT_S = 10.0
UPSTREAM_READ_TIMEOUT_S = 600.0
# Output tokens of a non-streamed answer, read from its `usage` without parsing the JSON.
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
# Request headers worth passing on; the client's Authorization is for the gateway, not engines.
_FORWARDED_HEADERS = ("Accept", "X-Request-Id", "OpenAI-Organization")
# Deepest nesting of a request body. OpenAI bodies nest a few levels (messages, content
# parts; tool and response-format schemas a few dozen at most). Python's JSON parser and
# serializer recurse once per level and raise RecursionError near 1,000 levels, so deeper
# bodies are refused with a 400 before anything else touches them.
MAX_JSON_DEPTH = 100
# From this many items, `json_depth_exceeds` first asks whether an array or object holds
# any container at all with one C-level pass (`set(map(type, ...))`), which costs a
# 100,000-id prompt half of what a Python loop over it would.
_SCAN_IN_C_FROM = 32
# A balancer of its own (a Proxy built without the gateway's) judges no host: it never
# reads the store, so this only has to be a valid age.
DEFAULT_HOST_LIVE_AFTER_S = 20.0
# Where a failed request goes next: (backend, replica, the replica of that version already
# tried or None, whether it may still fail over to the stable version).
_Retry = tuple[Backend, ReplicaSlot, ReplicaSlot | None, bool]


# Most upstream URLs kept parsed (replicas x paths: a handful per version); past this the
# cache starts afresh rather than grow with every replica a gateway ever saw.
_URL_CACHE_MAX = 4096


class _StreamMeter:
    """What a streamed answer's chunks tell about its version, as they pass."""

    __slots__ = ("started", "first_at", "last_at", "events")

    def __init__(self, started: float) -> None:
        self.started = started
        self.first_at = self.last_at = 0.0
        self.events = 0

    def see(self, chunk: bytes) -> bool:
        """Count a chunk; True for the first one (time to first byte is then known)."""
        self.last_at = time.monotonic()
        # One SSE event per generated token (vLLM streams token by token); counting the
        # marker is all the parsing a chunk gets.
        self.events += chunk.count(b"data: ")
        if self.first_at:
            return False
        self.first_at = self.last_at
        return True

    @property
    def ttfb(self) -> float:
        return self.first_at - self.started


class Proxy:
    """Handlers of `/v1/models`, `/v1/completions` and `/v1/chat/completions`."""

    def __init__(self, transitions: TransitionManager, metrics: GatewayMetrics,
                 max_body_bytes: int, *, mirror_max_inflight: int = 64,
                 replicas: ReplicaBalancer | None = None, traced: bool = False) -> None:
        self.transitions = transitions
        # Requests may be traced (`GATEWAY_TRACE_SAMPLE` with tracing on): then the model
        # id is left for the span and the span's `traceparent` goes to the engine.
        self.traced = traced
        # Which replica of a version a request goes to (fed by the gateway's reconcile
        # loop; without one, every replica a route names takes requests).
        self.replicas = replicas if replicas is not None else ReplicaBalancer(
            DEFAULT_HOST_LIVE_AFTER_S)
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.upstreams: Upstreams | None = None  # set when the app starts
        # Upstream URLs parsed once, not on every request.
        self._urls: dict[str, URL] = {}
        self._missing_credentials: set[str] = set()  # variables logged as missing, until set
        self.mirror_max_inflight = mirror_max_inflight
        # Copies to shadow versions still running: held here so that the loop keeps them
        # alive (it only keeps weak references), they count against the cap, and the
        # gateway can cancel them when it stops.
        self.mirrors: set[asyncio.Task[None]] = set()

    async def list_models(self, request: Request) -> Response:
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "turnout"}
                for name in self.transitions.table.served_names()]
        return json_response({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response | StreamResponse:
        return await self._forward(request, "/v1/completions")

    async def chat_completions(self, request: Request) -> Response | StreamResponse:
        return await self._forward(request, "/v1/chat/completions")

    # ------------------------------------------------------------------ forwarding

    async def _forward(self, request: Request, path: str) -> Response | StreamResponse:
        body, problem = await _parse_body(request, self.max_body_bytes)
        if problem is not None:
            self.metrics.reject("too_large" if problem.status == 413 else "bad_request")
            return problem
        assert body is not None
        name = body.get("model")
        if not isinstance(name, str) or not name:
            self.metrics.reject("missing_model")
            return error_response(400, "you must provide a model parameter",
                                  type="invalid_request_error", param="model",
                                  code="missing_model")
        model_id = self.transitions.table.resolve(name)
        if model_id is None:
            self.metrics.reject("unknown_model")
            return error_response(404, f"the model {name!r} does not exist",
                                  type="invalid_request_error", param="model",
                                  code="model_not_found")
        if self.traced:
            request.state[MODEL_KEY] = model_id
        user = body.get("user")
        user_key = user if isinstance(user, str) and user else request.headers.get(USER_HEADER)
        choice = self.transitions.choose(model_id, body=body, headers=request.headers,
                                         user_key=user_key)
        if choice is None:
            self.metrics.reject("no_route")
            return error_response(503, f"the model {name!r} has no version serving traffic",
                                  type="service_unavailable", param="model",
                                  code="model_unavailable")
        shadow = self.transitions.table.shadows.get(model_id)
        if shadow is not None:
            self._maybe_mirror(request, path, model_id, shadow, choice.backend.version, body)
        body["model"] = choice.backend.served_model_name
        return await self._send(request, path, model_id, choice.backend, body)

    async def _send(self, request: Request, path: str, model_id: str, backend: Backend,
                    body: dict[str, Any], replica: ReplicaSlot | None = None, *,
                    tried: ReplicaSlot | None = None,
                    may_fail_over: bool = True) -> Response | StreamResponse:
        """Forward to one replica of a version (`replica`, or the one with the fewest
        requests in flight). A failure before anything reached the client (connection
        refused or reset, connect timeout, a 5xx answer) is counted as that version's error
        and retried: first on another replica of the version, then on the model's stable
        version (on up to two of its replicas too). The user gets an answer, the failing
        version still gets the blame. A started stream is never replayed.

        `tried` is the replica of this version already tried (None: this is the first);
        `may_fail_over` is False once the request is on the stable version."""
        version = backend.version
        replicas = self.replicas.replicas(model_id, backend)
        if replica is None:
            replica = replicas.pick()
            assert replica is not None  # a set always has an active replica
        headers = _upstream_headers(request)
        if self.traced:
            tracing.inject(headers)
        started = time.monotonic()
        self.metrics.started(model_id, version)
        replica.inflight += 1
        failure: str | None = None  # error class, see GatewayMetrics.finished
        completed = False
        ttfb_s: float | None = None  # time to the first streamed byte, for the window
        itl_s: float | None = None  # a stream's inter-token latency, for the window
        retry: _Retry | None = None  # looked up only once the replica has failed
        try:
            async with self._post(backend, replica, path, body, headers) as upstream:
                failure = _status_failure(upstream.status)
                if failure == "5xx":
                    retry = self._retry(model_id, backend, replicas, replica, tried,
                                        may_fail_over)
                    if retry is not None:
                        log.info("%s/%s at %s answered %d; failing over to %s at %s",
                                 model_id, version, replica.url, upstream.status,
                                 retry[0].version, retry[1].url)
                content_type = upstream.headers.get("Content-Type", "application/json")
                if failure != "5xx" or retry is None:
                    if upstream.status == 200 and content_type.startswith("text/event-stream"):
                        response, failure, completed, ttfb_s, itl_s = await self._stream(
                            request, upstream, model_id, version, started)
                        return response
                    payload = await upstream.read()
                    completed = True
                    self._plain_tokens(model_id, version, upstream.status, payload)
                    return Response(payload, upstream.status,
                                    {"Content-Type": content_type, VERSION_HEADER: version})
        except (aiohttp.SocketTimeoutError, aiohttp.ConnectionTimeoutError) as exc:
            failure = "timeout"
            log.warning("upstream %s of %s/%s timed out: %r", replica.url, model_id, version,
                        exc)
            # A read timeout comes after the request was sent: too late to replay it.
            retry = None if isinstance(exc, aiohttp.SocketTimeoutError) \
                else self._retry(model_id, backend, replicas, replica, tried, may_fail_over)
            if retry is None:
                return error_response(504, f"upstream of version {version!r} timed out",
                                      type="upstream_error", code="gateway_timeout",
                                      headers={VERSION_HEADER: version})
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            failure = "connect"
            log.warning("upstream %s of %s/%s failed: %r", replica.url, model_id, version, exc)
            retry = self._retry(model_id, backend, replicas, replica, tried, may_fail_over)
            if retry is None:  # the logged detail names the upstream; clients never see it
                return error_response(502, f"version {version!r} of the model could not be "
                                           f"reached", type="upstream_error",
                                      code="bad_gateway", headers={VERSION_HEADER: version})
        finally:
            replica.inflight -= 1
            self.metrics.finished(model_id, version, time.monotonic() - started,
                                  failure=failure, completed=completed, ttfb_s=ttfb_s,
                                  itl_s=itl_s)
        assert retry is not None
        to, to_replica, to_tried, to_may_fail_over = retry
        self.metrics.failed_over(model_id, version, to.version)
        body["model"] = to.served_model_name
        return await self._send(request, path, model_id, to, body, to_replica, tried=to_tried,
                                may_fail_over=to_may_fail_over)

    def _retry(self, model_id: str, backend: Backend, replicas: ReplicaSet,
               failed: ReplicaSlot, tried: ReplicaSlot | None,
               may_fail_over: bool) -> _Retry | None:
        """Where a request that `failed` failed before its first byte goes next: another
        replica of the version if this was its first, else the stable version (once, and
        not if it is the failing version), else nowhere."""
        if tried is None:
            other = replicas.pick(exclude=failed)
            if other is not None:
                return backend, other, failed, may_fail_over
        if may_fail_over:
            stable = self.transitions.fallback(model_id, backend.version)
            if stable is not None:
                replica = self.replicas.replicas(model_id, stable).pick()
                assert replica is not None
                return stable, replica, None, False
        return None

    async def _stream(self, request: Request, upstream: Answer,
                      model_id: str, version: str,
                      started: float
                      ) -> tuple[StreamResponse, str | None, bool, float | None,
                                 float | None]:
        """Copy an SSE answer chunk by chunk; returns (response, error class, completed,
        seconds to the first byte or None when none came, inter-token latency or None).

        Leaving early (client gone, upstream broken) exits the caller's `async with`, which
        closes the upstream connection, so the engine stops generating for nobody.
        """
        response = StreamResponse(200, {
            "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            VERSION_HEADER: version,
        })
        meter = _StreamMeter(started)
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                if meter.see(chunk):
                    self.metrics.first_byte(model_id, version, meter.ttfb)
                await response.write(chunk)
            await response.write_eof()
            itl = self._generated(model_id, version, meter)
            return response, None, True, meter.ttfb if meter.first_at else None, itl
        except ConnectionResetError:  # the client went away: nothing left to write to
            log.debug("client left a stream of %s/%s", model_id, version)
            return response, None, False, None, None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            log.warning("stream from %s/%s broke: %r", model_id, version, exc)
            return response, "stream_broken", False, None, None

    # ------------------------------------------------------------------ mirroring

    def _maybe_mirror(self, request: Request, path: str, model_id: str, shadow: Backend,
                      chosen_version: str, body: dict[str, Any]) -> None:
        """Copy this request to the model's shadow with probability `mirror_percent / 100`.

        The draw is a fresh `random.random()`, independent of the one that picked the
        served version: reusing it would tie which requests are copied to which version
        served them (with a 50/50 split and 30% mirrored, every copy would come from the
        first version's half). The body is copied here, before the caller rewrites `model`
        for the served version; only top-level keys change, so a shallow copy suffices.
        """
        if shadow.version == chosen_version:
            return
        if random.random() * 100.0 >= shadow.mirror_percent:
            return
        if len(self.mirrors) >= self.mirror_max_inflight or self.upstreams is None:
            self.metrics.mirror_skip(model_id, shadow.version)
            return
        copy = {**body, "model": shadow.served_model_name}
        task = asyncio.create_task(
            self._mirror(path, model_id, shadow, copy, _upstream_headers(request)))
        self.mirrors.add(task)
        task.add_done_callback(self.mirrors.discard)
        self.metrics.mirror_sent(model_id, shadow.version)

    async def _mirror(self, path: str, model_id: str, shadow: Backend, body: dict[str, Any],
                      headers: dict[str, str]) -> None:
        """Send one copy and record its outcome under the shadow's version, classified as
        `_send` classifies a served request's (connect, timeout, 5xx, 4xx, stream_broken).

        Failures are logged at DEBUG only: a broken shadow fails every copy, and its
        errors are already counted where health verdicts and alerts look for them.
        """
        version = shadow.version
        replica = self.replicas.replicas(model_id, shadow).pick()
        assert replica is not None
        started = time.monotonic()
        self.metrics.started(model_id, version)
        replica.inflight += 1
        failure: str | None = None
        completed = False
        ttfb_s: float | None = None
        itl_s: float | None = None
        try:
            failure, completed, ttfb_s, itl_s = await self._mirror_exchange(
                path, model_id, shadow, replica, body, headers, started)
        except (aiohttp.SocketTimeoutError, aiohttp.ConnectionTimeoutError) as exc:
            failure = "timeout"
            log.debug("shadow %s/%s timed out: %r", model_id, version, exc)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            failure = "connect"
            log.debug("shadow %s/%s failed: %r", model_id, version, exc)
        except Exception:  # a bug here must not surface as "Task exception never retrieved"
            log.exception("mirroring to %s/%s failed unexpectedly", model_id, version)
        finally:
            replica.inflight -= 1
            self.metrics.finished(model_id, version, time.monotonic() - started,
                                  failure=failure, completed=completed, ttfb_s=ttfb_s,
                                  itl_s=itl_s)

    async def _mirror_exchange(self, path: str, model_id: str, shadow: Backend,
                               replica: ReplicaSlot, body: dict[str, Any],
                               headers: dict[str, str], started: float
                               ) -> tuple[str | None, bool, float | None, float | None]:
        """POST the copy and read its answer to the end; returns (error class, completed,
        seconds to the first streamed byte or None, inter-token latency or None)."""
        version = shadow.version
        async with self._post(shadow, replica, path, body, headers) as upstream:
            failure = _status_failure(upstream.status)
            content_type = upstream.headers.get("Content-Type", "")
            if upstream.status == 200 and content_type.startswith("text/event-stream"):
                return await self._drain(upstream, model_id, version, started)
            self._plain_tokens(model_id, version, upstream.status, await upstream.read())
            return failure, True, None, None

    async def _drain(self, upstream: Answer, model_id: str, version: str,
                     started: float
                     ) -> tuple[str | None, bool, float | None, float | None]:
        """Read a shadow's SSE answer to the end, measuring it as `_stream` measures a
        served one (time to first byte, tokens, inter-token time), and drop it."""
        meter = _StreamMeter(started)
        try:
            async for chunk in upstream.content.iter_any():
                if meter.see(chunk):
                    self.metrics.first_byte(model_id, version, meter.ttfb)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            log.debug("shadow stream from %s/%s broke: %r", model_id, version, exc)
            return "stream_broken", False, None, None
        itl = self._generated(model_id, version, meter)
        return None, True, meter.ttfb if meter.first_at else None, itl

    def _post(self, backend: Backend, replica: ReplicaSlot, path: str, body: dict[str, Any],
              headers: dict[str, str]) -> Any:
        """The upstream request of a served answer or of a shadow's copy, to one replica.

        An external endpoint's credential is read from this process's environment (the
        route holds only the variable's name). Without it, `MissingCredential` is raised
        before connecting and handled like a refused connection: counted as the
        version's error, failed over (another replica, then the stable version), else a
        502.
        """
        assert self.upstreams is not None, "gateway app not started"
        if backend.api_key_env:
            headers = {**headers, **self._credential(backend)}
        text = replica.base + path
        url = self._urls.get(text)
        if url is None:
            if len(self._urls) >= _URL_CACHE_MAX:
                self._urls.clear()
            url = self._urls[text] = URL(text)
        return self.upstreams.post(url, json.dumps(body).encode(), headers)

    def _plain_tokens(self, model_id: str, version: str, status: int, payload: bytes) -> None:
        """Tokens of a plain (not streamed) answer, from its `usage`."""
        if status == 200:
            usage = _COMPLETION_TOKENS.search(payload)
            if usage:
                self.metrics.generated(model_id, version, int(usage.group(1)))

    def _generated(self, model_id: str, version: str, meter: _StreamMeter) -> float | None:
        return self.metrics.generated(model_id, version,
                                      max(meter.events - 1, 0),  # minus [DONE]
                                      meter.last_at - meter.first_at)

    def _credential(self, backend: Backend) -> dict[str, str]:
        """The backend's bearer header. A missing variable is logged once until it is set
        again (then its next loss is logged too), not on every request."""
        name = backend.api_key_env or ""
        try:
            header = bearer_header(name)
        except LookupError:
            if name not in self._missing_credentials:
                self._missing_credentials.add(name)
                log.error("credential variable %s of version %s is not set in the gateway's "
                          "environment: its requests fail (and fail over)", name,
                          backend.version)
            raise MissingCredential(f"the gateway has no credential for version "
                                    f"{backend.version!r} ({name} is not set)") from None
        self._missing_credentials.discard(name)
        return header

    async def stop_mirrors(self) -> None:
        """Cancel the copies still in flight, for a gateway that stops: they are
        measurements nobody waits for. Each records its end (in-flight count back down,
        no outcome) as a client that left does."""
        tasks = list(self.mirrors)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MissingCredential(aiohttp.ClientConnectionError):
    """A backend's credential variable is not set in the gateway's environment."""


def _upstream_headers(request: Request) -> dict[str, str]:
    """Headers sent upstream: JSON plus the few client headers worth passing on."""
    headers = {"Content-Type": "application/json"}
    headers.update({h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers})
    return headers


def _status_failure(status: int) -> str | None:
    """Error class of an upstream answer's status (see `GatewayMetrics.finished`)."""
    if status >= 500:
        return "5xx"
    if status >= 400:
        return "4xx"
    return None


async def _parse_body(request: Request, limit: int
                      ) -> tuple[dict[str, Any] | None, Response | None]:
    try:
        raw = await request.read()
    except BodyTooLarge:
        return None, error_response(413, f"the request body is larger than the gateway's "
                                         f"limit of {limit} bytes",
                                    type="invalid_request_error", code="request_too_large")
    too_deep = False
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, error_response(400, "the request body is not valid JSON",
                                    type="invalid_request_error", code="invalid_json")
    except RecursionError:  # Python's parser gives up near 1,000 levels
        too_deep = True
    if too_deep or json_depth_exceeds(body, MAX_JSON_DEPTH):
        return None, error_response(400, f"the request body nests deeper than "
                                         f"{MAX_JSON_DEPTH} levels",
                                    type="invalid_request_error", code="json_too_deep")
    if not isinstance(body, dict):
        return None, error_response(400, "the request body must be a JSON object",
                                    type="invalid_request_error", code="invalid_json")
    return body, None


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether the parsed JSON `value` nests arrays and objects deeper than `limit`.

    Walks the containers level by level, never the text: the cost is the number of items
    in arrays and objects, so the common large bodies (long prompts, base64 images) cost
    as little as small ones (a few microseconds) where a scan of the bytes would cost
    about as much as parsing them. Long arrays of scalars (token-id prompts) are checked
    for containers in one C-level pass.
    """
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            items = container.values() if type(container) is dict else container
            if len(items) > _SCAN_IN_C_FROM:
                kinds = set(map(type, items))
                if dict not in kinds and list not in kinds:
                    continue
            below.extend(item for item in items if type(item) is dict or type(item) is list)
        level = below
    return False
