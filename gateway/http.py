"""The gateway's HTTP/1.1 server: asyncio protocols, requests parsed by llhttp.

Why not aiohttp's server, which both listeners ran on before: measured side by side at
concurrency 1 (non-streamed completions against the benchmark's upstream, 2026-12-02), a
minimal aiohttp handler around the gateway's upstream client added 0.32 ms to a request
and the same handler on this server 0.15 ms; the gateway on aiohttp added 0.37 ms and
vLLM's Rust router 0.29 ms. aiohttp's per-request machinery (request and response
objects, its handler task, middleware chain, header multidicts both ways) was most of
what the gateway added. The gateway needs little of a general server: a few
fixed paths, JSON bodies read whole (bounded), answers whole or streamed chunk by chunk,
keep-alive, and the handler cancelled when its client goes away, so that an engine stops
generating for nobody (as aiohttp's `handler_cancellation`).

Parsing is llhttp's, through `httptools` (what uvicorn uses); this module does the rest:
- bounds: the head (request line and headers) at `MAX_HEAD_BYTES` (431 past it), the body
  at `max_body_bytes` (`Request.read` raises `BodyTooLarge` once the limit is passed, and
  the connection closes after the answer: the rest is never read), a connection idle for
  `KEEPALIVE_S` (or stuck part-way through a request head or body) is closed, at most
  `MAX_PIPELINED` requests queued on one connection (reading pauses beyond);
- requests on one connection are answered in order (HTTP/1.1 pipelining);
- `Expect: 100-continue` is answered before the body is read;
- an HTTP/1.0 client gets `Connection: close` and a stream delimited by the close;
- a handler's exception is logged and answered 500 through the server's `error` factory;
  malformed requests 400 and the connection closed.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import httptools
from multidict import CIMultiDict

log = logging.getLogger("gateway.http")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers (llhttp sets no bound)
KEEPALIVE_S = 75.0  # as aiohttp's server: a kept-alive connection idle this long is closed
MAX_PIPELINED = 16  # requests read ahead on one connection before reading pauses
SHUTDOWN_GRACE_S = 60.0  # in-flight requests finish within this when the server stops
BACKLOG = 2048  # connections waiting to be accepted (uvicorn's; asyncio's default is 100)

_REASONS = {status.value: status.phrase for status in HTTPStatus}


class BodyTooLarge(Exception):
    """The request body is longer than the server's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


class Request:
    """One parsed request: method, path (without the query), headers (any case), body."""

    __slots__ = ("method", "path", "query_string", "headers", "http_version", "keep_alive",
                 "state", "_body", "_too_large", "_limit", "_connection")

    def __init__(self, method: str, target: str, headers: CIMultiDict[str],
                 http_version: str, keep_alive: bool, body: bytes, too_large: bool,
                 limit: int, connection: _Connection | None = None) -> None:
        self.method = method
        self.keep_alive = keep_alive  # what the client asked for (HTTP/1.1 default: yes)
        self._connection = connection
        path, _, self.query_string = target.partition("?")
        self.path = path
        self.headers = headers
        self.http_version = http_version
        self.state: dict[str, Any] = {}  # what handlers leave for middlewares (a span's model)
        self._body = body
        self._too_large = too_large
        self._limit = limit

    def query(self) -> dict[str, str]:
        """The query's parameters, the first value of each (admin calls; the OpenAI
        endpoints read none)."""
        params: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(self.query_string, keep_blank_values=True):
            params.setdefault(name, value)
        return params

    async def read(self) -> bytes:
        if self._too_large:
            raise BodyTooLarge(self._limit)
        return self._body


class Response:
    """A whole answer."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, body: bytes = b"", status: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = headers if headers is not None else {}
        self.body = body


def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data).encode(), status,
                    {"Content-Type": "application/json", **(headers or {})})


class StreamResponse:
    """An answer written piece by piece (chunked; close-delimited to HTTP/1.0 clients).

    `write` waits while the client's socket buffer is full (the transport's flow control)
    and raises `ConnectionResetError` once the client is gone."""

    __slots__ = ("status", "headers", "_connection", "_chunked", "_ended")

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = headers if headers is not None else {}
        self._connection: _Connection | None = None
        self._chunked = True
        self._ended = False

    async def prepare(self, request: Request) -> None:
        connection = request._connection
        if connection is None:
            raise RuntimeError("the request is not being served")
        self._connection = connection
        self._chunked = request.http_version != "1.0"
        if not self._chunked:
            connection.keep_alive = False  # the close ends the stream
        framing = {"Transfer-Encoding": "chunked"} if self._chunked else {}
        connection.write_head(self.status, {**self.headers, **framing},
                              connection.keep_alive and request.keep_alive)
        await connection.drain()

    async def write(self, data: bytes) -> None:
        connection = self._connection
        assert connection is not None, "prepare() first"
        if not data:
            return
        connection.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        await connection.drain()

    async def write_eof(self) -> None:
        connection = self._connection
        assert connection is not None, "prepare() first"
        if self._ended:
            return
        self._ended = True
        if self._chunked:
            connection.write(b"0\r\n\r\n")
            await connection.drain()


AnyResponse = Response | StreamResponse
Handler = Callable[[Request], Awaitable[AnyResponse]]
# Around a handler (auth, tracing): `await middleware(request, handler)`.
Middleware = Callable[[Request, Handler], Awaitable[AnyResponse]]
# What answers the server's own errors (400, 431, 500) in the application's shape:
# (status, message, code).
ErrorFactory = Callable[[int, str, str], Response]


class Routes:
    """A handler per (method, path); an unknown path answers 404, a known one asked with
    another method 405 (with `Allow`), through `error`. HEAD is answered as GET, without
    the body."""

    def __init__(self, error: ErrorFactory) -> None:
        self.error = error
        self._paths: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._paths.setdefault(path, {})[method] = handler

    async def __call__(self, request: Request) -> AnyResponse:
        methods = self._paths.get(request.path)
        if methods is None:
            return self.error(404, "Not Found", "not_found")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            response = self.error(405, "Method Not Allowed", "method_not_allowed")
            response.headers["Allow"] = ", ".join(sorted(methods))
            return response
        return await handler(request)


def with_middlewares(handler: Handler, middlewares: list[Middleware]) -> Handler:
    """`handler` inside `middlewares`, the first outermost."""
    for middleware in reversed(middlewares):
        def wrapped(request: Request, middleware: Middleware = middleware,
                    inner: Handler = handler) -> Awaitable[AnyResponse]:
            return middleware(request, inner)
        handler = wrapped
    return handler


class _Date:
    """The `Date` header's value, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


_DATE = _Date()


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.keep_alive = True  # False: close once the answer under way is written
        self.closed = False
        self._head_written = False  # of the answer under way
        self._queue: collections.deque[Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._head_bytes = 0
        self._length: str | None = None  # the Content-Length header of the message
        self._continue = False  # it asked for `Expect: 100-continue`
        self._upgrade = False  # it carries `Upgrade` (llhttp then leaves its body to us)
        self._raw_left = 0  # bytes of such a body still to come
        self._method, self._version, self._keep = "", "1.1", True  # of the message
        self._in_message = False
        # A too-large message was handed on (or a bad one refused): what follows is dropped.
        self._discarding = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._active_at = self.loop.time()  # a request began or was answered

    # ------------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._idle = self.loop.call_at(self._active_at + self.server.keepalive_s,
                                       self._idle_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client went away"))
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a client gone: its handler stops (and its engine call)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._raw_left:
            data = self._take_raw_body(data)
            if not data:
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # `Upgrade: h2c` (curl --http2 on http://) and the like, which a server may
            # ignore: the request is answered in HTTP/1.1. llhttp stops at the end of its
            # head; its body (Content-Length) is read here, then a new parser reads on.
            if self._in_message:
                self._refuse(400, "protocol upgrades are not supported", "unsupported_upgrade")
                return
            self.parser = httptools.HttpRequestParser(self)
            rest = data[exc.args[0]:] if exc.args and isinstance(exc.args[0], int) else b""
            if rest:
                self.data_received(rest)
        except httptools.HttpParserError as exc:
            if not self.closed:
                self._refuse(400, f"malformed request: {exc}", "bad_request")

    def eof_received(self) -> bool | None:
        return None  # a client that stopped sending has said all it will: close

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._url, self._headers, self._body = [], [], []
        self._body_bytes = self._head_bytes = 0
        self._length, self._continue = None, False
        self._upgrade = False
        self._active_at = self.loop.time()  # its head and body must come within keepalive_s

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        self._url.append(url)
        self._check_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        text = value.decode("latin-1")
        self._headers.append((name.decode("latin-1"), text))
        if len(name) == 14 and name.lower() == b"content-length":
            self._length = text
        elif len(name) == 6 and name.lower() == b"expect":
            self._continue = text.lower() == "100-continue"
        elif len(name) == 7 and name.lower() == b"upgrade":
            self._upgrade = True
        self._check_head()

    def on_headers_complete(self) -> None:
        if self.closed:
            return
        parser = self.parser
        self._method = parser.get_method().decode("latin-1")
        self._version = parser.get_http_version()
        self._keep = parser.should_keep_alive()
        length = self._length
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._hand_on_too_large()
            return
        if self._continue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._discarding:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.server.max_body_bytes:
            self._hand_on_too_large()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._discarding or self.closed:
            return
        self._in_message = False
        if self._upgrade and self._length is not None and self._length.isdigit() and \
                int(self._length) > self._body_bytes:
            self._raw_left = int(self._length) - self._body_bytes  # see data_received
            return
        self._enqueue()

    def _take_raw_body(self, data: bytes) -> bytes:
        """The body of an upgrade request from `data`; returns what follows it."""
        piece = data[:self._raw_left]
        self._raw_left -= len(piece)
        self._body_bytes += len(piece)
        self._body.append(piece)
        if not self._raw_left:
            self._enqueue()
        return data[len(piece):]

    # ------------------------------------------------------------------ requests

    def _check_head(self) -> None:
        if self._head_bytes > MAX_HEAD_BYTES and not self.closed:
            self._refuse(431, f"the request's head is longer than {MAX_HEAD_BYTES} bytes",
                         "headers_too_large")

    def _hand_on_too_large(self) -> None:
        """Queue the request now, its body unread past the limit: its handler answers
        (413, in the application's shape) and the connection then closes."""
        self._discarding = True
        self.keep_alive = False
        self._enqueue()

    def _enqueue(self) -> None:
        request = Request(
            self._method, b"".join(self._url).decode("latin-1"), CIMultiDict(self._headers),
            self._version, self._keep and not self._discarding, b"".join(self._body),
            self._discarding, self.server.max_body_bytes, self)
        self._body = []
        self._queue.append(request)
        if len(self._queue) >= MAX_PIPELINED and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        if self._task is None:
            self._task = self.loop.create_task(self._answer_all())

    async def _answer_all(self) -> None:
        """Answer the queued requests in order, then wait for the next (idle timer)."""
        try:
            while self._queue and not self.closed:
                request = self._queue.popleft()
                if self._reading_paused and self.transport is not None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                await self._answer(request)
                if not (self.keep_alive and request.keep_alive) or self.server.closing:
                    self.close()
                    return
        finally:
            self._task = None
            self._active_at = self.loop.time()

    async def _answer(self, request: Request) -> None:
        self._head_written = False
        try:
            try:
                response = await self.server.handler(request)
                if isinstance(response, StreamResponse) and response._connection is None:
                    raise RuntimeError("a stream answer was returned unprepared")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unexpected error on %s %s", request.method, request.path)
                if self._head_written:  # part of an answer went out: the close ends it
                    self.keep_alive = False
                    return
                response = self.server.error(500, "internal gateway error", "internal_error")
            if isinstance(response, Response):
                self.write_head(response.status, response.headers,
                                self.keep_alive and request.keep_alive,
                                body=b"" if request.method == "HEAD" else response.body,
                                length=len(response.body))
                await self.drain()
            elif not response._ended:  # a stream its handler left open
                self.keep_alive = False  # its framing is unfinished: the client sees a close
        except (ConnectionResetError, BrokenPipeError):
            self.keep_alive = False

    def write_head(self, status: int, headers: dict[str, str], keep_alive: bool, *,
                   body: bytes | None = None, length: int | None = None) -> None:
        """The status line and headers (with `Content-Length` and `body` for a whole
        answer), in one write."""
        reason = _REASONS.get(status, "Unknown")
        lines = [f"HTTP/1.1 {status} {reason}".encode("latin-1"), b"Date: " + _DATE.value()]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in headers.items()]
        if length is not None:
            lines.append(b"Content-Length: %d" % length)
        if not keep_alive:
            lines.append(b"Connection: close")
        lines.append(b"\r\n")
        self.write(b"\r\n".join(lines) + (body or b""))
        self._head_written = True

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client went away")
        if not self._writing_paused:
            return
        self._drain = self.loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer a request the server cannot take (malformed, head too long) and close,
        unless an earlier request is still being answered (then just close after it)."""
        self._discarding = True
        self.keep_alive = False
        if self._task is None and not self.closed:
            response = self.server.error(status, message, code)
            try:
                self.write_head(status, response.headers, False, body=response.body,
                                length=len(response.body))
            except ConnectionResetError:
                pass
            self.close()

    def _idle_out(self) -> None:
        """Close a connection idle (or part-way through a request) for `keepalive_s`; one
        timer per connection, re-armed lazily rather than on every request."""
        due = self._active_at + self.server.keepalive_s
        if self._task is None and self.loop.time() >= due:
            self._idle = None
            self.close()
            return
        if self._task is not None:  # answering: look again a whole period later
            due = self.loop.time() + self.server.keepalive_s
        self._idle = self.loop.call_at(due, self._idle_out)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpServer:
    """Serve `handler` on host:port. `error` answers the server's own errors in the
    application's shape; `stop()` lets in-flight requests finish (up to `grace_s`)."""

    def __init__(self, handler: Handler, *, max_body_bytes: int,
                 error: ErrorFactory, keepalive_s: float = KEEPALIVE_S) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.error = error
        self.keepalive_s = keepalive_s
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True,
            reuse_port=reuse_port or None, backlog=BACKLOG)

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop listening, close idle connections, give requests under way `grace_s` to
        finish, then close what is left (cancelling those handlers)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection._task is None:
                connection.close()
        busy = [c._task for c in self.connections if c._task is not None]
        if busy:
            await asyncio.wait(busy, timeout=grace_s)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
