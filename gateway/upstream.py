"""The gateway's HTTP/1.1 client to engines: keep-alive connections over asyncio protocols.

Why not aiohttp's `ClientSession`: measured here against the benchmark's upstream at
concurrency 1, its request path cost 160-180 µs of CPU per request, this one 40 µs, and a
round trip took 330 µs against 190 µs: the difference was most of what the gateway added
to a request's latency. The gateway needs little of a general client: POST a JSON body to
a known engine, read the status and `Content-Type`, then the body whole or piece by piece
(SSE), with keep-alive, a cap of connections per engine, a connect timeout and a timeout
between bytes.

Answers are parsed by llhttp through `httptools` (what uvicorn uses), not by Python code
walking the chunked framing: measured side by side (`bench.gateway_overhead --only ab`,
2026-12-01), the gateway's CPU per 64-chunk stream went from 0.535 to 0.484 ms at
concurrency 64 and from 0.602 to 0.576 ms at 256.

Failures are raised as aiohttp's exception classes, which the proxy already classifies: a
refused connection is an `OSError`, a connect timeout `aiohttp.ConnectionTimeoutError`, no
byte for `read_timeout_s` `aiohttp.SocketTimeoutError`, an engine closing the connection
before its answer is whole `aiohttp.ServerDisconnectedError`, a broken body framing
`aiohttp.ClientPayloadError`. A request sent on an idle kept-alive connection that the
engine had closed meanwhile (uvicorn closes idle ones after 5 s) is sent again once on a
new connection, before anything of its answer arrived: that is not the engine's failure.
Leaving an exchange before its answer is read to the end (a client gone) closes the
connection, so the engine stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import zlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp
import httptools
from yarl import URL

# Answers buffered per connection beyond what the proxy has taken: past this the socket is
# no longer read (TCP pushes back on the engine) until the proxy catches up.
_HIGH_WATER = 1024 * 1024
_MAX_HEAD = 64 * 1024  # bytes of an answer before its headers end (llhttp sets no bound)


class Headers(dict[str, str]):
    """Response headers by lower-case name; `get` takes any case."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an engine and the answer being read on it. Answers
    are parsed by llhttp (`httptools`, as uvicorn does): framing, chunked decoding and
    body-less statuses in C, one Python callback per piece of body. An interim answer
    (1xx, as `100 Continue`) has no body and is not the answer: the one after it is."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.key: tuple[str, int, bool] = ("", 0, False)  # (host, port, TLS) it was opened for
        self._parser: httptools.HttpResponseParser | None = None
        self._headers = Headers()
        self._head_done: asyncio.Future[tuple[int, Headers]] | None = None
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._eof = False  # the answer's body is whole
        self._got_bytes = False
        self._head_bytes = 0  # bytes received before the answer's headers ended
        self._until_close = False  # no length, not chunked: the body ends with the connection
        self._interim = False  # the message being parsed is a 1xx, not the answer
        self._keep = True  # the engine keeps the connection open after this answer
        self._last_data_at = 0.0  # loop time of the last byte received
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._eof:
            return
        if self._until_close and exc is None and self._head_done is not None and \
                self._head_done.done():
            self._finish()
        else:
            self._fail(aiohttp.ServerDisconnectedError(
                "the engine closed the connection before its answer was whole"))

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        self._last_data_at = self.loop.time()
        if self._parser is None or self._eof:
            # Bytes nobody asked for (before a request, or after a whole answer): the
            # connection's framing can no longer be trusted.
            self.close()
            return
        if self._head_done is not None and not self._head_done.done():
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD:
                self._fail(aiohttp.ClientPayloadError("answer headers too long"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(aiohttp.ClientPayloadError(f"malformed answer: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed engine has said all it will

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self._eof:  # a second answer in the bytes of the first: not reusable
            self._keep = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._eof:
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._head_done is not None
        if self._eof or self._head_done.done():
            return
        headers, status = self._headers, self._parser.get_status_code()
        if status < 200:  # interim: llhttp reads on to the answer after it
            self._interim = True
            self._headers = Headers()
            return
        self._keep = self._parser.should_keep_alive()
        self._until_close = status not in (204, 304) and "content-length" not in headers \
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        self._head_done.set_result((status, headers))

    def on_body(self, body: bytes) -> None:
        if self._eof:
            return
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self._eof:
            self._finish()

    # ------------------------------------------------------------------ the exchange

    def begin(self, request: bytes) -> asyncio.Future[tuple[int, Headers]]:
        assert self.transport is not None
        self._head_done = self.loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._headers = Headers()
        self._eof = self._got_bytes = self._until_close = self._interim = False
        self._head_bytes = 0
        self._error = None
        # What the last answer left unread (a 5xx failed over from, read whole by the
        # socket but not by the proxy) is not this answer's.
        self._pieces.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self.transport.write(request)
        return self._head_done

    @property
    def answered(self) -> bool:
        """Whether any byte of the current answer arrived."""
        return self._got_bytes

    @property
    def reusable(self) -> bool:
        return self._eof and self._keep and not self._until_close and not self.closed and \
            self._error is None and self.transport is not None and \
            not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def piece(self, timeout_s: float) -> bytes:
        """What of the body has arrived (all pieces so far, joined), b"" once it is whole.
        Waits at most `timeout_s` without a byte (one lazily re-armed timer per wait, not
        one per piece)."""
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = waiter = self.loop.create_future()
            self._last_data_at = self.loop.time()
            self._timer = self.loop.call_at(self._last_data_at + timeout_s,
                                            self._check_silence, waiter, timeout_s)
            try:
                await waiter
            finally:
                self._timer.cancel()
                self._waiter = None
        pieces = self._pieces
        data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _finish(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._eof:
            self._error = error
        if self._head_done is not None and not self._head_done.done():
            self._head_done.set_exception(error)
        self._wake()
        self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _check_silence(self, waiter: asyncio.Future[None], timeout_s: float) -> None:
        if waiter.done():
            return
        silent_until = self._last_data_at + timeout_s
        if self.loop.time() < silent_until:  # bytes came meanwhile: wait the rest
            self._timer = self.loop.call_at(silent_until, self._check_silence, waiter,
                                            timeout_s)
            return
        waiter.set_exception(aiohttp.SocketTimeoutError(
            "no byte from the engine within the read timeout"))


class Answer:
    """What the proxy reads of an engine's answer (the shape it read from aiohttp)."""

    def __init__(self, connection: _Connection, status: int, headers: Headers,
                 read_timeout_s: float) -> None:
        self.status = status
        self.headers = headers
        self.content = self  # `answer.content.iter_any()`, as with aiohttp
        self._connection = connection
        self._timeout = read_timeout_s
        encoding = headers.get("content-encoding", "identity").lower()
        self._decoder = None if encoding in ("identity", "") else \
            zlib.decompressobj(31 if encoding == "gzip" else 15)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while True:
            data = await self._connection.piece(self._timeout)
            if not data:
                if self._decoder is not None:
                    rest = self._decoder.flush()
                    if rest:
                        yield rest
                return
            if self._decoder is not None:
                try:
                    data = self._decoder.decompress(data)
                except zlib.error as exc:
                    raise aiohttp.ClientPayloadError(f"bad compressed body: {exc}") from exc
                if not data:
                    continue
            yield data

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.iter_any()])


class _Exchange:
    """`async with upstreams.post(...) as answer`: one request and its answer."""

    def __init__(self, pool: Upstreams, url: URL, request: bytes) -> None:
        self.pool, self.url, self.request = pool, url, request
        self.connection: _Connection | None = None
        self.slot: asyncio.Semaphore | None = None

    async def __aenter__(self) -> Answer:
        key = (self.url.host or "", self.url.port or 80, self.url.scheme == "https")
        self.slot = self.pool.slot(key)
        await self.slot.acquire()
        try:
            for attempt in range(2):
                connection = self.connection = await self.pool.connection(key)
                head = connection.begin(self.request)
                try:
                    status, headers = await self._headers(connection, head)
                except (aiohttp.ServerDisconnectedError, ConnectionResetError,
                        BrokenPipeError):
                    # An idle kept-alive connection the engine closed meanwhile: send again
                    # once on a new one, as nothing of the answer came.
                    if attempt == 0 and connection.reused and not connection.answered:
                        connection.close()
                        continue
                    raise
                return Answer(connection, status, headers, self.pool.read_timeout_s)
            raise AssertionError("unreachable")
        except BaseException:
            await self._end(reuse=False)
            raise

    async def _headers(self, connection: _Connection,
                       head: asyncio.Future[tuple[int, Headers]]) -> tuple[int, Headers]:
        timer = connection.loop.call_later(self.pool.read_timeout_s, _time_out_head, head)
        try:
            return await head
        finally:
            timer.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self._end(reuse=kind is None)

    async def _end(self, *, reuse: bool) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            if reuse and connection.reusable:
                self.pool.release(connection)
            else:
                connection.close()
        if self.slot is not None:
            self.slot.release()
            self.slot = None


def _time_out_head(head: asyncio.Future[Any]) -> None:
    if not head.done():
        head.set_exception(aiohttp.SocketTimeoutError(
            "no answer from the engine within the read timeout"))


class Upstreams:
    """Keep-alive connections to engines, at most `max_per_host` at once to each."""

    def __init__(self, *, max_per_host: int, connect_timeout_s: float,
                 read_timeout_s: float) -> None:
        self.max_per_host = max_per_host
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._slots: dict[tuple[str, int, bool], asyncio.Semaphore] = {}
        self._ssl: ssl.SSLContext | None = None

    def post(self, url: URL, body: bytes, headers: dict[str, str]) -> _Exchange:
        host = url.host or ""
        authority = f"[{host}]" if ":" in host else host
        if not url.is_default_port():
            authority += f":{url.port}"
        lines = [f"POST {url.raw_path_qs} HTTP/1.1", f"Host: {authority}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        return _Exchange(self, url, request)

    def slot(self, key: tuple[str, int, bool]) -> asyncio.Semaphore:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = asyncio.Semaphore(self.max_per_host)
        return slot

    async def connection(self, key: tuple[str, int, bool]) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.transport is not None and not connection.closed and \
                    not connection.transport.is_closing():
                connection.reused = True
                return connection
        loop = asyncio.get_running_loop()
        host, port, tls = key
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop), host, port,
                    ssl=self._ssl if tls else None)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(
                f"connecting to {host}:{port} took over {self.connect_timeout_s:g}s") from None
        connection.key = key
        return connection

    def release(self, connection: _Connection) -> None:
        """Keep a connection whose answer was read whole for the next request."""
        connection.reused = False
        self._idle.setdefault(connection.key, []).append(connection)

    async def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
