"""The client listener's HTTP/1.1 server (`gateway.http`), over real sockets with raw
bytes: what a client sees on the wire (framing, keep-alive, pipelining, bounds, errors)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from gateway.errors import server_error
from gateway.http import (
    MAX_HEAD_BYTES,
    BodyTooLarge,
    HttpServer,
    Request,
    Response,
    Routes,
    StreamResponse,
    json_response,
)
from tests.support import free_port

LIMIT = 1000


async def echo(request: Request) -> Response:
    body = await request.read()
    return json_response({"method": request.method, "path": request.path,
                          "query": request.query_string, "bytes": len(body),
                          "agent": request.headers.get("user-agent")})


async def too_large_aware(request: Request) -> Response:
    try:
        return await echo(request)
    except BodyTooLarge as exc:
        return json_response({"error": str(exc)}, 413)


async def stream(request: Request) -> StreamResponse:
    response = StreamResponse(200, {"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(3):
        await response.write(f"data: {i}\n\n".encode())
    await response.write_eof()
    return response


async def slow(request: Request) -> Response:
    await asyncio.sleep(0.3)
    return Response(b"slow done", 200, {"Content-Type": "text/plain"})


async def broken(request: Request) -> Response:
    raise RuntimeError("a bug")


cancelled = asyncio.Event()


async def hangs(request: Request) -> Response:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return Response(b"never")


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, int]]:
    routes = Routes(server_error)
    routes.add("POST", "/echo", too_large_aware)
    routes.add("GET", "/echo", echo)
    routes.add("GET", "/stream", stream)
    routes.add("GET", "/slow", slow)
    routes.add("GET", "/broken", broken)
    routes.add("GET", "/hangs", hangs)
    server = HttpServer(routes, max_body_bytes=LIMIT, error=server_error, keepalive_s=0.5)
    port = free_port()
    await server.start("127.0.0.1", port)
    yield server, port
    await server.stop(grace_s=1)


async def send(port: int, raw: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection with `raw` written on it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    return reader, writer


async def exchange(port: int, raw: bytes) -> bytes:
    """Everything the server answers to `raw` until it closes the connection."""
    reader, writer = await send(port, raw)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split bytes of one or more whole (Content-Length) answers."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


GET = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSE = b"GET /echo?last=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, GET + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5"
                          b"\r\n\r\nhello" + CLOSE)
    got = answers(data)
    assert [s for s, _, _ in got] == [200, 200, 200]
    bodies = [json.loads(b) for _, _, b in got]
    assert [(b["method"], b["bytes"], b["query"]) for b in bodies] == [
        ("GET", 0, ""), ("POST", 5, ""), ("GET", 0, "last=1")]
    assert got[2][1]["connection"] == "close" and "connection" not in got[0][1]
    assert "date" in got[0][1]


async def test_headers_are_read_in_any_case(server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"GET /echo HTTP/1.1\r\nuSeR-aGeNt: probe\r\n"
                                b"Connection: close\r\n\r\n")
    assert json.loads(answers(data)[0][2])["agent"] == "probe"


async def test_unknown_paths_and_methods_answer_json_errors(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"GET /nope HTTP/1.1\r\n\r\nDELETE /echo HTTP/1.1\r\n\r\n"
                          + CLOSE)
    (s1, _, b1), (s2, h2, b2), (s3, _, _) = answers(data)
    assert s1 == 404 and json.loads(b1)["error"]["code"] == "not_found"
    assert s2 == 405 and json.loads(b2)["error"]["code"] == "method_not_allowed"
    assert h2["allow"] == "GET, POST" and s3 == 200


async def test_head_is_answered_as_get_without_the_body(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"HEAD /echo HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head and body == b""


async def test_a_body_past_the_limit_is_refused_unread_and_the_connection_closed(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    # Announced: answered at once, before the body is sent (no 100 Continue either).
    data = await exchange(port, b"POST /echo HTTP/1.1\r\nContent-Length: 5000\r\n"
                                b"Expect: 100-continue\r\n\r\n")
    ((status, headers, body),) = answers(data)
    assert status == 413 and headers["connection"] == "close"
    assert "1000 bytes" in json.loads(body)["error"]
    # Chunked: refused once the limit is passed.
    chunk = b"x" * 600
    data = await exchange(port, b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + (b"%x\r\n%b\r\n" % (len(chunk), chunk)) * 2 + b"0\r\n\r\n")
    assert answers(data)[0][0] == 413
    # At the limit: accepted.
    data = await exchange(port, b"POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n"
                                b"Connection: close\r\n\r\n" + b"y" * LIMIT)
    assert json.loads(answers(data)[0][2])["bytes"] == LIMIT


async def test_expect_100_continue_is_answered_before_the_body(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await send(port, b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n"
                                      b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == \
        b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abc")
    ((status, _, body),) = answers(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    assert status == 200 and json.loads(body)["bytes"] == 3


async def test_malformed_requests_and_oversized_heads_are_refused(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert answers(data)[0][0] == 400
    data = await exchange(port, b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES
                          + b"\r\n\r\n")
    ((status, _, body),) = answers(data)
    assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"


async def test_streams_are_chunked_to_1_1_and_close_delimited_to_1_0(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"GET /stream HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"".join(b"%x\r\ndata: %d\n\n\r\n" % (9, i) for i in range(3)) + \
        b"0\r\n\r\n"
    data = await exchange(port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"chunked" not in head and b"Connection: close" in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_a_handlers_bug_is_a_json_500_and_the_connection_lives_on(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    data = await exchange(port, b"GET /broken HTTP/1.1\r\n\r\n" + CLOSE)
    (s1, _, b1), (s2, _, _) = answers(data)
    assert s1 == 500 and json.loads(b1)["error"] == {
        "message": "internal gateway error", "type": "server_error", "param": None,
        "code": "internal_error"}
    assert s2 == 200


async def test_a_client_going_away_cancels_its_handler(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    cancelled.clear()
    _, writer = await send(port, b"GET /hangs HTTP/1.1\r\n\r\n")
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_idle_and_stalled_connections_are_closed(
        server: tuple[HttpServer, int]) -> None:
    _, port = server  # keepalive_s = 0.5
    assert answers(await exchange(port, GET))[0][0] == 200  # then closed
    # A head that stops part-way: closed without an answer.
    assert await exchange(port, b"GET /echo HTTP/1.1\r\nHost:") == b""


async def test_stop_lets_a_request_under_way_finish(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    reader, writer = await send(port, b"GET /slow HTTP/1.1\r\n\r\n")
    await asyncio.sleep(0.1)
    await srv.stop(grace_s=5)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    ((status, _, body),) = answers(data)
    assert status == 200 and body == b"slow done"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_an_upgrade_request_is_answered_in_http_1_1(
        server: tuple[HttpServer, int]) -> None:
    """`curl --http2` on http:// asks for `Upgrade: h2c`; a server may ignore it."""
    _, port = server
    data = await exchange(port, b"GET /echo HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings"
                                b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                          + CLOSE)
    assert [s for s, _, _ in answers(data)] == [200, 200]
    # With a body (curl --http2 -d ...): llhttp leaves it unread at the upgrade.
    data = await exchange(port, b"POST /echo HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings"
                                b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
                                b"Content-Length: 11\r\n\r\n{\"a\": true}" + CLOSE)
    (s1, _, b1), (s2, _, _) = answers(data)
    assert s1 == 200 and json.loads(b1)["bytes"] == 11 and s2 == 200


async def test_an_upgrade_requests_body_may_arrive_later(
        server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await send(port, b"POST /echo HTTP/1.1\r\nConnection: Upgrade\r\n"
                                      b"Upgrade: h2c\r\nContent-Length: 6\r\n\r\n{}")
    await asyncio.sleep(0.1)
    writer.write(b"    " + CLOSE)
    ((s1, _, b1), (s2, _, _)) = answers(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    assert s1 == 200 and json.loads(b1)["bytes"] == 6 and s2 == 200
