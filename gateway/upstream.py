"""The gateway's HTTP/1.1 client to engines: keep-alive connections over asyncio protocols.

Why not aiohttp's `ClientSession`: measured here against the benchmark's upstream at
concurrency 1, its request path cost 160-180 µs of CPU per request, this one 40 µs, and a
round trip took 330 µs against 190 µs: the difference was most of what the gateway added
to a request's latency. The gateway needs little of a general client: POST a JSON body to
a known engine, read the status and `Content-Type`, then the body whole or piece by piece
(SSE), with keep-alive, a cap of connections per engine, a connect timeout and a timeout
between bytes.

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
from yarl import URL

# Answers buffered per connection beyond what the proxy has taken: past this the socket is
# no longer read (TCP pushes back on the engine) until the proxy catches up.
_HIGH_WATER = 1024 * 1024
_MAX_HEAD = 64 * 1024  # status line and headers of an answer


class Headers(dict[str, str]):
    """Response headers by lower-case name; `get` takes any case."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an engine and the answer being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.key: tuple[str, int, bool] = ("", 0, False)  # (host, port, TLS) it was opened for
        self._head = bytearray()
        self._head_done: asyncio.Future[tuple[int, Headers]] | None = None
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._eof = False  # the answer's body is whole
        self._got_bytes = False
        self._mode = ""  # "length", "chunked" or "close"
        self._left = 0  # body bytes still due ("length"), or of the current chunk
        self._chunk = bytearray()  # undecoded chunked framing
        self._chunk_state = "size"  # size | data | crlf | trailer
        self._last_data_at = 0.0  # loop time of the last byte received
        self._timer: asyncio.TimerHandle | None = None
        self._keep = True  # the engine did not say `Connection: close`

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._mode == "close" and self._head_done is not None and \
                self._head_done.done() and exc is None:
            self._finish()
        elif not self._eof:
            self._fail(aiohttp.ServerDisconnectedError(
                "the engine closed the connection before its answer was whole"))

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        self._last_data_at = self.loop.time()
        if self._head_done is not None and not self._head_done.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _MAX_HEAD:
                    self._fail(aiohttp.ClientPayloadError("answer headers too long"))
                return
            data = bytes(self._head[end + 4:])
            try:
                status, headers = _parse_head(bytes(self._head[:end]))
            except ValueError as exc:
                self._fail(aiohttp.ClientPayloadError(f"malformed answer: {exc}"))
                return
            self._head.clear()
            self._start_body(status, headers)
            self._head_done.set_result((status, headers))
            if self._eof or not data:
                return
        if self._mode == "chunked":
            self._dechunk(data)
        elif self._mode == "length":
            if len(data) > self._left:
                data = data[:self._left]
            self._left -= len(data)
            self._deliver(data)
            if self._left == 0:
                self._finish()
        elif self._mode == "close":
            self._deliver(data)

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed engine has said all it will

    # ------------------------------------------------------------------ the exchange

    def begin(self, request: bytes) -> asyncio.Future[tuple[int, Headers]]:
        assert self.transport is not None
        self._head_done = self.loop.create_future()
        self._eof = self._got_bytes = False
        self._error = None
        self._mode = ""
        # What the last answer left unread (a 5xx failed over from, read whole by the
        # socket but not by the proxy) is not this answer's.
        self._pieces.clear()
        self._buffered = 0
        self._chunk.clear()
        self._chunk_state = "size"
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
        return self._eof and self._keep and self._mode != "close" and not self.closed and \
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

    # ------------------------------------------------------------------ body framing

    def _start_body(self, status: int, headers: Headers) -> None:
        self._keep = "close" not in headers.get("connection", "").lower()
        if status in (204, 304) or status < 200:
            self._mode = "length"
            self._finish()
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif "content-length" in headers:
            self._mode, self._left = "length", int(headers["content-length"])
            if self._left == 0:
                self._finish()
        else:
            self._mode = "close"

    def _dechunk(self, data: bytes) -> None:
        """Decode chunked framing as it arrives, cut anywhere: walks `data` by index (an
        engine sends an event per chunk, so this runs once per token)."""
        if self._chunk:
            data = bytes(self._chunk) + data
            self._chunk.clear()
        pos, size = 0, len(data)
        while pos < size:
            state = self._chunk_state
            if state == "data":
                take = min(self._left, size - pos)
                self._deliver(data[pos:pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._chunk_state = "crlf"
            elif state == "size":
                end = data.find(b"\r\n", pos)
                if end < 0:
                    break
                try:
                    self._left = int(data[pos:end].split(b";", 1)[0], 16)
                except ValueError:
                    self._fail(aiohttp.ClientPayloadError("malformed chunk size"))
                    return
                pos = end + 2
                self._chunk_state = "data" if self._left else "trailer"
            elif state == "crlf":
                if size - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    self._fail(aiohttp.ClientPayloadError("malformed chunk end"))
                    return
                pos += 2
                self._chunk_state = "size"
            else:  # trailer: header lines, then an empty one
                end = data.find(b"\r\n", pos)
                if end < 0:
                    break
                blank, pos = end == pos, end + 2
                if blank:
                    self._chunk_state = "size"
                    self._finish()
                    return
        if pos < size:
            self._chunk += data[pos:]

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

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


def _parse_head(head: bytes) -> tuple[int, Headers]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"status line {lines[0][:80]!r}")
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"header line {line[:80]!r}")
        key = name.strip().decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return int(parts[1]), headers


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
