"""The proxy stage against a real stub upstream: what the upstream received, what the client got."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from sidecar.app import METRICS
from tests.conftest import SidecarFactory

Seen = web.AppKey("seen", list[dict[str, Any]])


def recording_upstream() -> web.Application:
    """Echoes the request body and records method, path and headers it saw."""
    app = web.Application()
    app[Seen] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        app[Seen].append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": request.headers.copy(),
                "body": body,
            }
        )
        response = web.Response(
            body=body,
            headers={
                "Content-Type": "application/x-test",
                "X-End-To-End": "kept",
                "X-Up-Secret": "hop",
                "Connection": "X-Up-Secret",
                "Cache-Control": "no-store",
            },
        )
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_body_and_end_to_end_headers_pass_unchanged(sidecar_for: SidecarFactory) -> None:
    upstream = recording_upstream()
    client = await sidecar_for(upstream)
    payload = os.urandom(300_000)
    response = await client.post(
        URL("/api/items?x=1&y=%2F", encoded=True),
        data=payload,
        headers={"X-Custom": "v", "Content-Type": "application/octet-stream"},
    )
    assert response.status == 200
    assert await response.read() == payload
    assert response.headers["X-End-To-End"] == "kept"
    assert response.headers["Content-Type"] == "application/x-test"
    assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    seen = upstream[Seen][0]
    assert seen["method"] == "POST"
    assert seen["path_qs"] == "/api/items?x=1&y=%2F"
    assert seen["headers"]["X-Custom"] == "v"
    assert seen["body"] == payload


async def test_connection_named_headers_are_removed_both_ways(
    sidecar_for: SidecarFactory,
) -> None:
    upstream = recording_upstream()
    client = await sidecar_for(upstream)
    response = await client.get(
        "/",
        headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "for-this-hop-only",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "TE": "trailers",
        },
    )
    assert response.status == 200
    seen = upstream[Seen][0]["headers"]
    for name in ("X-Secret", "Keep-Alive", "Proxy-Authorization", "TE"):
        assert name not in seen, name
    assert "X-Up-Secret" not in response.headers


async def test_upstream_sees_the_sidecars_forwarding_headers_not_the_clients(
    sidecar_for: SidecarFactory,
) -> None:
    upstream = recording_upstream()
    client = await sidecar_for(upstream)
    await client.get(
        "/",
        headers={
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "Forwarded": "for=6.6.6.6;host=evil.example",
            "X-Real-IP": "6.6.6.6",
            "Host": "console.example",
        },
    )
    seen = upstream[Seen][0]["headers"]
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Host") == ["console.example"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen["Via"] == "1.1 sidecar"
    assert "Forwarded" not in seen
    assert "X-Real-IP" not in seen


@pytest.mark.parametrize(
    "name",
    [
        "X_Forwarded_User",
        "X-Forwarded_User",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "True-Client-IP",
        "CF-Connecting-IP",
        "X-Remote-User",
        "X-Forwarded-User",
    ],
)
async def test_lookalike_forwarding_and_identity_headers_never_reach_the_console(
    sidecar_for: SidecarFactory, name: str
) -> None:
    upstream = recording_upstream()
    client = await sidecar_for(upstream)
    await client.get("/static/app.css", headers={name: "/admin"})
    assert name not in upstream[Seen][0]["headers"]


async def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                if b"Connection: close" not in request:
                    break  # one answer is all a kept-alive exchange will get
    finally:
        writer.close()
    return b"".join(chunks)


async def test_absolute_form_target_cannot_change_upstream_or_forwarded_host(
    sidecar_for: SidecarFactory,
) -> None:
    upstream = recording_upstream()
    client = await sidecar_for(upstream)
    port = client.server.port
    assert port is not None
    answer = await raw_exchange(
        port,
        b"GET http://evil.example:1/steal?q=1 HTTP/1.1\r\nHost: console.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    seen = upstream[Seen][0]
    assert seen["path_qs"] == "/steal?q=1"
    assert seen["headers"]["X-Forwarded-Host"] == "console.example"


async def test_request_target_is_forwarded_byte_for_byte(sidecar_for: SidecarFactory) -> None:
    upstream = recording_upstream()
    client = await sidecar_for(upstream)
    port = client.server.port
    assert port is not None
    target = b"/files/a%2Fb/%E2%9C%93?q=%2F&r=a+b&empty="
    answer = await raw_exchange(
        port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream[Seen][0]["path_qs"] == target.decode()


async def test_content_length_with_transfer_encoding_is_rejected(
    sidecar_for: SidecarFactory,
) -> None:
    upstream = recording_upstream()
    client = await sidecar_for(upstream)
    port = client.server.port
    assert port is not None
    answer = await raw_exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\n",
    )
    assert answer.split(b" ")[1] == b"400"
    assert upstream[Seen] == []


async def test_upstream_set_cookie_is_never_replayed_to_another_client(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    sidecar_for: SidecarFactory,
) -> None:
    # Addressed by hostname: aiohttp's default cookie jar ignores IP hosts, which would hide
    # a shared jar in this test.
    upstream = web.Application()
    cookies_seen: list[str | None] = []

    async def set_cookie(request: web.Request) -> web.Response:
        response = web.Response(text="set")
        response.set_cookie("console_session", "alice-secret", path="/")
        return response

    async def whoami(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        return web.Response(text="ok")

    upstream.router.add_get("/login", set_cookie)
    upstream.router.add_get("/whoami", whoami)
    server = await aiohttp_server(upstream, host="127.0.0.1")
    client = await sidecar_for(f"http://localhost:{server.port}")
    first = await client.get("/login")
    assert first.headers["Set-Cookie"].startswith("console_session=alice-secret")
    # A second caller without cookies: the test client's own jar must not interfere.
    client.session.cookie_jar.clear()
    await client.get("/whoami")
    assert cookies_seen == [None]


async def test_slow_stream_reaches_client_before_upstream_finishes(
    sidecar_for: SidecarFactory,
) -> None:
    release = asyncio.Event()
    upstream = web.Application()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first-chunk\n")
        await asyncio.wait_for(release.wait(), 10)
        await response.write(b"rest\n")
        return response

    upstream.router.add_get("/events", slow)
    client = await sidecar_for(upstream)
    response = await client.get("/events")
    first = await asyncio.wait_for(response.content.readline(), 5)
    assert first == b"first-chunk\n"
    release.set()
    assert await response.read() == b"rest\n"


async def test_upstream_down_is_502(sidecar_for: SidecarFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await sidecar_for(f"http://127.0.0.1:{port}")
    response = await client.get("/")
    assert response.status == 502
    metrics = client.app[METRICS]
    assert metrics.upstream_errors_total.labels("connect")._value.get() == 1


async def test_upstream_slower_than_read_timeout_is_504_near_that_time(
    sidecar_for: SidecarFactory,
) -> None:
    upstream = web.Application()

    async def stuck(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    upstream.router.add_get("/", stuck)
    client = await sidecar_for(upstream, upstream={"read_timeout": "0.5s"})
    started = time.monotonic()
    response = await client.get("/")
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert 0.4 < elapsed < 3.0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_cut_off_mid_body_reaches_client_as_an_error(
    framing: str, sidecar_for: SidecarFactory
) -> None:
    upstream = web.Application()

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if framing == "content-length":
            response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.router.add_get("/download", cut)
    client = await sidecar_for(upstream)
    response = await client.get("/download")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_request_body_over_the_cap_is_413_and_never_forwarded_whole(
    sidecar_for: SidecarFactory,
) -> None:
    upstream = recording_upstream()
    client = await sidecar_for(upstream, listen={"max_body_size": "64KiB"})
    declared = await client.post("/upload", data=b"x" * (64 * 1024 + 1))
    assert declared.status == 413

    async def chunked_body() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"y" * 4096

    streamed = await client.post("/upload", data=chunked_body())
    assert streamed.status == 413
    assert all(len(seen["body"]) <= 64 * 1024 for seen in upstream[Seen])
    exact = await client.post("/upload", data=b"z" * (64 * 1024))
    assert exact.status == 200


async def test_gzip_body_passes_through_compressed(sidecar_for: SidecarFactory) -> None:
    import gzip

    compressed = gzip.compress(b"hello " * 1000)
    upstream = web.Application()

    async def gz(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    upstream.router.add_get("/", gz)
    client = await sidecar_for(upstream)
    response = await client.get("/", auto_decompress=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert await response.read() == compressed


def websocket_upstream(close_codes: list[int | None]) -> web.Application:
    app = web.Application()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v2",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4001, message=b"bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
        close_codes.append(ws.close_code)
        return ws

    app.router.add_get("/ws", handler)
    return app


async def test_websocket_text_binary_subprotocol_and_upstream_close_code(
    sidecar_for: SidecarFactory,
) -> None:
    codes: list[int | None] = []
    client = await sidecar_for(websocket_upstream(codes))
    async with client.ws_connect("/ws", protocols=("chat.v1", "chat.v2")) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"
        await ws.send_bytes(b"\x00\x01\xff")
        binary = await ws.receive(timeout=5)
        assert binary.type is WSMsgType.BINARY
        assert binary.data == b"echo:\x00\x01\xff"
        await ws.send_str("close-me")
        closing = await ws.receive(timeout=5)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == 4001
        assert closing.extra == "bye"


async def test_websocket_client_close_code_reaches_upstream(
    sidecar_for: SidecarFactory,
) -> None:
    codes: list[int | None] = []
    client = await sidecar_for(websocket_upstream(codes))
    ws = await client.ws_connect("/ws", protocols=("chat.v2",))
    await ws.send_str("hi")
    await ws.receive(timeout=5)
    await ws.close(code=4001, message=b"leaving")
    for _ in range(50):
        if codes:
            break
        await asyncio.sleep(0.05)
    assert codes == [4001]


async def test_websocket_ping_payload_round_trips(sidecar_for: SidecarFactory) -> None:
    codes: list[int | None] = []
    client = await sidecar_for(websocket_upstream(codes))
    async with client.ws_connect("/ws", autoping=False) as ws:
        await ws.ping(b"are-you-there")
        pong = await ws.receive(timeout=5)
        assert pong.type is WSMsgType.PONG
        assert pong.data == b"are-you-there"


async def test_websocket_refused_by_upstream_keeps_its_status(
    sidecar_for: SidecarFactory,
) -> None:
    upstream = web.Application()

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, text="no")

    upstream.router.add_get("/ws", refuse)
    client = await sidecar_for(upstream)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws")
    assert refused.value.status == 403


async def test_public_listener_does_not_serve_metrics(sidecar_for: SidecarFactory) -> None:
    upstream = web.Application()
    client = await sidecar_for(upstream)
    response = await client.get("/metrics")
    assert response.status == 404  # the stub upstream's answer, not ours
    assert "sidecar_requests_total" not in await response.text()


async def test_admin_metrics_are_valid_exposition_and_count_decisions(
    sidecar_for: SidecarFactory,
    aiohttp_client: Callable[..., Awaitable[Any]],
) -> None:
    from sidecar.app import build_admin_app

    client = await sidecar_for(recording_upstream())
    await client.get("/")
    admin = await aiohttp_client(build_admin_app(client.app))
    response = await admin.get("/metrics")
    text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    allowed = next(
        s.value
        for s in families["sidecar_requests"].samples
        if s.name == "sidecar_requests_total" and s.labels["decision"] == "allowed"
    )
    assert allowed == 1
    for name in (
        "sidecar_request_duration_seconds",
        "sidecar_upstream_duration_seconds",
        "sidecar_upstream_errors",
        "sidecar_build_info",
        "sidecar_ip_rules",
    ):
        assert name in families, name
    assert (await admin.get("/healthz")).status == 200
    ready = await admin.get("/readyz")
    assert ready.status == 200


async def test_readyz_is_unready_when_upstream_is_down(
    sidecar_for: SidecarFactory, aiohttp_client: Callable[..., Awaitable[Any]]
) -> None:
    from sidecar.app import build_admin_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await sidecar_for(f"http://127.0.0.1:{port}")
    admin = await aiohttp_client(build_admin_app(client.app))
    response = await admin.get("/readyz")
    assert response.status == 503
    assert (await response.json())["reason"] == "upstream unreachable"


async def test_request_log_line_has_the_fields_operators_need(
    sidecar_for: SidecarFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    client = await sidecar_for(recording_upstream())
    with caplog.at_level("INFO", logger="sidecar.access"):
        await client.get("/reports?token=secret")
    record = next(r for r in caplog.records if r.name == "sidecar.access")
    logged: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    assert logged["method"] == "GET"
    assert logged["path"] == "/reports"
    assert logged["status"] == 200
    assert logged["decision"] == "allowed"
    assert logged["client_ip"] == "127.0.0.1"
    assert logged["upstream_status"] == 200
    assert "secret" not in repr(logged)


async def test_head_304_and_expect_continue_behave(sidecar_for: SidecarFactory) -> None:
    upstream = web.Application()

    async def resource(request: web.Request) -> web.StreamResponse:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"'})
        body = await request.read()
        return web.Response(body=body or b"x" * 1234, headers={"ETag": '"v1"'})

    upstream.router.add_route("*", "/r", resource)
    client = await sidecar_for(upstream)
    head = await client.head("/r")
    assert head.status == 200
    assert head.headers["Content-Length"] == "1234"
    assert await head.read() == b""
    cached = await client.get("/r", headers={"If-None-Match": '"v1"'})
    assert cached.status == 304
    assert await cached.read() == b""
    port = client.server.port
    assert port is not None
    answer = await raw_exchange(
        port,
        b"POST /r HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\n\r\nhello",
    )
    assert b"200 OK" in answer
    assert answer.endswith(b"hello")


async def test_upstream_protocol_errors_never_log_credentials(
    sidecar_for: SidecarFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        # Content-Length and Transfer-Encoding together: the client parser refuses it.
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
            b"Set-Cookie: upstream=SECRET-FROM-UPSTREAM\r\n\r\nabc"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await sidecar_for(f"http://127.0.0.1:{port}")
        with caplog.at_level("INFO"):
            # No cookie: the identity stage has nothing to ask; the proxy meets the error.
            response = await client.get(
                "/path?token=QUERY-SECRET", headers={"X-Api-Key": "HEADER-SECRET"}
            )
        assert response.status == 502
    finally:
        server.close()
        await server.wait_closed()
    logged = "\n".join(
        f"{r.getMessage()} {getattr(r, 'fields', '')}"
        for r in caplog.records
        if r.name.startswith("sidecar")  # not the test server's own access log
    )
    assert "upstream" in logged
    for secret in ("QUERY-SECRET", "HEADER-SECRET", "SECRET-FROM-UPSTREAM"):
        assert secret not in logged, secret


@pytest.mark.parametrize(
    ("trusted", "sent", "expected"),
    [
        pytest.param(True, "https", "https", id="trusted TLS balancer says https"),
        pytest.param(True, "http, https", "https", id="rightmost entry counts"),
        pytest.param(True, "gopher", "http", id="nonsense ignored"),
        pytest.param(False, "https", "http", id="untrusted client cannot claim https"),
    ],
)
async def test_forwarded_proto_is_believed_only_from_trusted_proxies(
    sidecar_for: SidecarFactory, trusted: bool, sent: str, expected: str
) -> None:
    upstream = recording_upstream()
    network = {"trusted_proxies": ["127.0.0.0/8"]} if trusted else {}
    client = await sidecar_for(upstream, network=network)
    await client.get("/", headers={"X-Forwarded-Proto": sent, "X-Forwarded-For": "192.0.2.1"})
    assert upstream[Seen][0]["headers"].getall("X-Forwarded-Proto") == [expected]


async def test_a_stray_upstream_response_never_reaches_the_next_caller(
    sidecar_for: SidecarFactory,
) -> None:
    async def misbehaving(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if b"GET /first" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                await writer.drain()
                await asyncio.sleep(0.05)
                # Unasked for: a second response on the same keep-alive connection.
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Stray: 1\r\n\r\nstray")
                await writer.drain()
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(misbehaving, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await sidecar_for(f"http://127.0.0.1:{port}")
        first = await client.get("/first")
        assert await first.read() == b"first"
        await asyncio.sleep(0.2)
        second = await client.get("/second")
        assert "X-Stray" not in second.headers
        assert await second.read() == b"second"
    finally:
        server.close()
        await server.wait_closed()
