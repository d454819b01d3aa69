"""Review findings (attack-review) on the public listener: an outsider with no account and
one address held every upstream connection, so the console was unreachable for everyone.
Fixed: the pool has a deadline (upstream.pool_timeout), one client has a share of it
(upstream.max_requests_per_client), WebSockets are counted apart (upstream.max_websockets),
bodies and slow readers have idle deadlines (listen.body_timeout, send_timeout), and one IPv6
/64 counts as one address (listen.max_connections_per_address). tests/test_upstream_capacity.py
and tests/listener push each of those limits."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass

from aiohttp import ClientSession, ClientTimeout, WSMsgType, web

from sidecar.listener import ConnectionCounts
from tests.conftest import ServeFactory

DOWNLOAD = b"x" * (4 * 1024 * 1024)  # a console's JS bundle, a report export...


def console() -> web.Application:
    app = web.Application()

    async def upload(request: web.Request) -> web.Response:
        body = await request.read()  # any form or JSON POST handler reads its body first
        return web.Response(text=f"got {len(body)} bytes")

    async def download(request: web.Request) -> web.Response:
        return web.Response(body=DOWNLOAD)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="console page")

    async def live(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for msg in socket:
            if msg.type is WSMsgType.TEXT:
                await socket.send_str(msg.data)
        return socket

    app.router.add_get("/live", live)
    app.router.add_post("/upload", upload)
    app.router.add_get("/static/app.js", download)
    app.router.add_get("/{tail:.*}", page)
    return app


async def answered_within(url: str, seconds: float) -> float | None:
    started = time.monotonic()
    try:
        async with ClientSession() as session:
            async with session.get(url, timeout=ClientTimeout(total=seconds)) as response:
                await response.read()
                return time.monotonic() - started
    except TimeoutError:
        return None


async def test_slow_request_bodies_from_one_address_take_every_upstream_connection(
    serve_sidecar: ServeFactory,
) -> None:
    served = await serve_sidecar(console(), upstream={"read_timeout": "60s"})  # the default
    writers = []
    # upstream.max_connections (100) requests, under max_connections_per_address (256):
    # each sends a complete head in time, then its body one byte at a time (or never).
    for _ in range(100):
        _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: console\r\nContent-Length: 65536\r\n\r\nx")
        await writer.drain()
        writers.append(writer)
    await asyncio.sleep(0.5)
    try:
        took = await answered_within(served.url("/"), 5)
        assert took is not None, "an anonymous page load waited 5 s and more"
    finally:
        for writer in writers:
            writer.close()


async def test_clients_that_never_read_an_answer_hold_upstream_connections_forever(
    serve_sidecar: ServeFactory,
) -> None:
    # A short read timeout, to show that it does not free them either.
    served = await serve_sidecar(console(), upstream={"read_timeout": "1s"})
    sockets = []
    for _ in range(100):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
        # An exempt static asset: no identity, no MFA; then never read the answer.
        await asyncio.get_running_loop().sock_sendall(
            sock, b"GET /static/app.js HTTP/1.1\r\nHost: console\r\n\r\n"
        )
        sockets.append(sock)
    await asyncio.sleep(3)  # three read timeouts later
    try:
        took = await answered_within(served.url("/"), 5)
        assert took is not None, "an anonymous page load waited 5 s and more"
    finally:
        for sock in sockets:
            sock.close()


async def test_open_websockets_take_every_upstream_connection(
    serve_sidecar: ServeFactory,
) -> None:
    """Each relayed WebSocket keeps its upstream connection checked out of the pool
    (upstream.max_connections, 100) for as long as it is open, and a request waiting for a
    pool slot waits without a deadline: 100 open tabs with a live view (or one member
    opening 100 WebSockets) and no page of the console loads for anyone."""
    served = await serve_sidecar(console())
    async with ClientSession() as session:
        sockets = [await session.ws_connect(served.url("/live")) for _ in range(100)]
        try:
            took = await answered_within(served.url("/"), 5)
            assert took is not None, "a page load waited 5 s and more"
        finally:
            for socket_ in sockets:
                await socket_.close()


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 15.0
    max_connections: int = 10_000  # the defaults
    max_connections_per_address: int = 256


def test_one_ipv6_host_cannot_take_every_connection_slot() -> None:
    """Any IPv6 host holds a /64 (a cloud VM, a home line): as far as the per-address cap is
    concerned it is 2**64 clients, so it alone fills listen.max_connections. Each of its
    connections sends one request an hour (kept alive for aiohttp's 3630 s), and everyone
    else is answered 503. (blocked_audit already aggregates IPv6 per /64.)"""
    counts = ConnectionCounts()
    attacker = ipaddress.IPv6Network("2001:db8:66:66::/64")
    admitted = sum(
        counts.admit(attacker[i], exempt=False, limits=Limits()) is None for i in range(1, 10_001)
    )
    assert admitted <= Limits().max_connections_per_address
    assert counts.admit(ipaddress.ip_address("198.51.100.7"), exempt=False, limits=Limits()) is None
