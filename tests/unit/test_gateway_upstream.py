"""The gateway's client to engines (`gateway.upstream`) against real local HTTP servers
written byte by byte: keep-alive, an idle connection the engine closed, chunked bodies cut
anywhere, timeouts, refused and broken connections, compressed bodies, leaving early."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from gateway.upstream import Upstreams
from tests.support import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

class Server:
    """A TCP server answering each request with `answer(request_number)`."""

    def __init__(self, answer: Callable[[int], list[bytes]], *, close_after: bool = False,
                 pause_s: float = 0.0) -> None:
        self.answer, self.close_after, self.pause_s = answer, close_after, pause_s
        self.connections = 0
        self.requests = 0
        self.disconnected = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> URL:
        return URL(f"http://127.0.0.1:{self.port}/v1/completions")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                self.requests += 1
                for piece in self.answer(self.requests):
                    writer.write(piece)
                    await writer.drain()
                    if self.pause_s:
                        await asyncio.sleep(self.pause_s)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.disconnected.set()
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def plain(body: bytes, extra: bytes = b"") -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body]


def chunked(pieces: list[bytes]) -> list[bytes]:
    framed = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" \
           b"Transfer-Encoding: chunked\r\n\r\n"
    whole = head + framed
    return [whole[i:i + 1] for i in range(len(whole))]  # one byte per write


@pytest_asyncio.fixture(loop_scope="session")
async def pool() -> AsyncIterator[Upstreams]:
    upstreams = Upstreams(max_per_host=4, connect_timeout_s=2, read_timeout_s=2)
    yield upstreams
    await upstreams.close()


async def post(pool: Upstreams, server: Server) -> tuple[int, bytes]:
    async with pool.post(server.url, b'{"x": 1}', {"Content-Type": "application/json"}) as a:
        return a.status, await a.read()


async def test_keep_alive_reuses_one_connection(pool: Upstreams) -> None:
    server = await Server(lambda n: plain(f'{{"n": {n}}}'.encode())).start()
    try:
        assert [await post(pool, server) for _ in range(3)] == [
            (200, b'{"n": 1}'), (200, b'{"n": 2}'), (200, b'{"n": 3}')]
        assert server.connections == 1
    finally:
        await server.stop()


async def test_an_idle_connection_the_engine_closed_is_not_a_failure(pool: Upstreams) -> None:
    server = await Server(lambda n: plain(b"ok"), close_after=True).start()
    try:
        for _ in range(3):
            assert await post(pool, server) == (200, b"ok")
        assert server.connections == 3
    finally:
        await server.stop()


async def test_chunked_bodies_cut_anywhere(pool: Upstreams) -> None:
    events = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    server = await Server(lambda n: chunked(events)).start()
    try:
        async with pool.post(server.url, b"{}", {}) as answer:
            assert answer.headers.get("Content-Type") == "text/event-stream"
            got = b"".join([piece async for piece in answer.content.iter_any()])
        assert got == b"".join(events)
        assert await post(pool, server) == (200, b"".join(events))  # and reused after
        assert server.connections == 1
    finally:
        await server.stop()


async def test_gzip_bodies_are_decoded(pool: Upstreams) -> None:
    server = await Server(lambda n: plain(gzip.compress(b'{"a": 1}'),
                                          b"Content-Encoding: gzip\r\n")).start()
    try:
        assert await post(pool, server) == (200, b'{"a": 1}')
    finally:
        await server.stop()


async def test_silence_is_a_read_timeout() -> None:
    quick = Upstreams(max_per_host=4, connect_timeout_s=2, read_timeout_s=0.3)
    server = await Server(lambda n: [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
                                     b"c"], pause_s=1.0).start()
    try:
        with pytest.raises(aiohttp.SocketTimeoutError):
            await post(quick, server)
    finally:
        await server.stop()
        await quick.close()


async def test_an_answer_cut_short_is_a_disconnect(pool: Upstreams) -> None:
    server = await Server(lambda n: [b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort"],
                          close_after=True).start()
    try:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(pool, server)
    finally:
        await server.stop()


async def test_leaving_early_closes_the_connection(pool: Upstreams) -> None:
    server = await Server(lambda n: chunked([b"data: x\n\n"] * 200), pause_s=0.001).start()
    try:
        async with pool.post(server.url, b"{}", {}) as answer:
            async for _ in answer.content.iter_any():
                break
        await asyncio.wait_for(server.disconnected.wait(), 5)  # the engine saw us go
    finally:
        await server.stop()


async def test_a_free_port_refuses() -> None:
    upstreams = Upstreams(max_per_host=1, connect_timeout_s=2, read_timeout_s=2)
    try:
        with pytest.raises(OSError):
            async with upstreams.post(URL(f"http://127.0.0.1:{free_port()}/v1/x"), b"{}", {}):
                pass
    finally:
        await upstreams.close()


async def test_connection_close_is_not_reused(pool: Upstreams) -> None:
    server = await Server(lambda n: plain(b"ok", b"Connection: close\r\n")).start()
    try:
        assert [await post(pool, server) for _ in range(2)] == [(200, b"ok")] * 2
        assert server.connections == 2
    finally:
        await server.stop()


async def test_no_content_has_no_body(pool: Upstreams) -> None:
    server = await Server(lambda n: [b"HTTP/1.1 204 No Content\r\n\r\n"]).start()
    try:
        assert [await post(pool, server) for _ in range(2)] == [(204, b"")] * 2
        assert server.connections == 1
    finally:
        await server.stop()


async def test_not_modified_has_no_body_whatever_its_length_says(pool: Upstreams) -> None:
    server = await Server(lambda n: [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"]
                          ).start()
    try:
        assert [await post(pool, server) for _ in range(2)] == [(304, b"")] * 2
        assert server.connections == 1
    finally:
        await server.stop()


async def test_an_interim_answer_is_skipped_for_the_one_after_it(pool: Upstreams) -> None:
    server = await Server(lambda n: [b"HTTP/1.1 100 Continue\r\n\r\n"] + plain(b'{"n": 1}')
                          ).start()
    try:
        assert [await post(pool, server) for _ in range(2)] == [(200, b'{"n": 1}')] * 2
        assert server.connections == 1
    finally:
        await server.stop()


async def test_a_body_without_length_ends_with_the_connection(pool: Upstreams) -> None:
    server = await Server(lambda n: [b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end"],
                          close_after=True).start()
    try:
        assert [await post(pool, server) for _ in range(2)] == [(200, b"until the end")] * 2
        assert server.connections == 2
    finally:
        await server.stop()


async def test_headers_without_end_are_refused(pool: Upstreams) -> None:
    server = await Server(lambda n: [b"HTTP/1.1 200 OK\r\n"]
                          + [b"X-Filler: " + b"x" * 1000 + b"\r\n"] * 100).start()
    try:
        with pytest.raises(aiohttp.ClientPayloadError, match="headers too long"):
            await post(pool, server)
    finally:
        await server.stop()


async def test_no_answer_at_all_is_a_read_timeout() -> None:
    quick = Upstreams(max_per_host=4, connect_timeout_s=2, read_timeout_s=0.3)
    server = await Server(lambda n: [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
                          pause_s=1.0).start()
    try:
        with pytest.raises(aiohttp.SocketTimeoutError, match="no answer"):
            await post(quick, server)
    finally:
        await server.stop()
        await quick.close()


async def test_a_slow_stream_with_no_long_silence_is_read_whole() -> None:
    """Bytes 0.1 s apart for over three times the 0.3 s read timeout: never silent long."""
    quick = Upstreams(max_per_host=4, connect_timeout_s=2, read_timeout_s=0.3)
    events = [b"data: %d\n\n" % i for i in range(10)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" \
           b"Transfer-Encoding: chunked\r\n\r\n"
    server = await Server(lambda n: [head, *(framed[i:i + 14] for i in
                                             range(0, len(framed), 14)), b"0\r\n\r\n"],
                          pause_s=0.1).start()
    try:
        assert await post(quick, server) == (200, b"".join(events))
        assert await post(quick, server) == (200, b"".join(events))  # the timer re-armed
    finally:
        await server.stop()
        await quick.close()
