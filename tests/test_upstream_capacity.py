"""No client can hold the upstream for everyone: the pool's deadline, the per-client caps,
WebSockets counted apart, and the idle deadline on request bodies.

Each test takes a sidecar served as ``sidecar run`` serves it, pushes one limit past its
configured value over real sockets, and asserts what the next client gets (503 with
Retry-After, 408, or its answer), what the console saw, and that the slots come back.
Every wait is bounded; the limits are configured short so that no test waits long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from sidecar.app import METRICS, UPSTREAM
from sidecar.metrics import Metrics
from sidecar.proxy import BUSY_RETRY_AFTER, AiohttpUpstream
from tests.conftest import Served, ServeFactory

TRUSTED = {"network": {"trusted_proxies": ["127.0.0.1/32"]}}


@dataclass
class Console:
    """A console whose ``/hold`` answers only when released; it records what it saw."""

    held: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    uploads: list[str] = field(default_factory=list)
    websockets: int = 0


SEEN = web.AppKey("seen", Console)


def console_app() -> web.Application:
    app = web.Application()
    app[SEEN] = seen = Console()

    async def hold(request: web.Request) -> web.Response:
        seen.held += 1
        try:
            await seen.release.wait()
        finally:
            seen.held -= 1
        return web.Response(text="released")

    async def upload(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except BaseException as exc:  # the sidecar gave up on the body: the read breaks
            seen.uploads.append(f"broken: {type(exc).__name__}")
            raise
        seen.uploads.append(f"{len(body)} bytes")
        return web.Response(text=f"got {len(body)} bytes")

    async def live(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        seen.websockets += 1
        try:
            async for msg in socket:
                if msg.type is WSMsgType.TEXT:
                    await socket.send_str(msg.data)
        finally:
            seen.websockets -= 1
        return socket

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="console page")

    app.router.add_get("/hold", hold)
    app.router.add_post("/upload", upload)
    app.router.add_get("/live", live)
    app.router.add_get("/{tail:.*}", page)
    return app


async def until(check: object, what: str, timeout: float = 10.0) -> None:
    """Poll ``check()`` (bounded) until it is true."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        await asyncio.sleep(0.02)


def errors(served: Served, kind: str) -> float:
    metrics: Metrics = served.app[METRICS]
    value: float = metrics.upstream_errors_total.labels(kind)._value.get()
    return value


def refused(served: Served, reason: str) -> float:
    metrics: Metrics = served.app[METRICS]
    value: float = metrics.connections_refused_total.labels(reason)._value.get()
    return value


def transport(served: Served) -> AiohttpUpstream:
    upstream = served.app[UPSTREAM]
    assert isinstance(upstream, AiohttpUpstream)
    return upstream


def seen(served: Served, app: web.Application) -> Console:
    return app[SEEN]


@contextlib.asynccontextmanager
async def holding(
    session: aiohttp.ClientSession, url: str, count: int, console: Console, *, sources: list[str]
) -> AsyncIterator[list[asyncio.Task[int]]]:
    """``count`` requests held at the console (from the X-Forwarded-For ``sources`` in turn),
    released and awaited on exit."""

    async def one(source: str) -> int:
        async with session.get(url, headers={"X-Forwarded-For": source}) as response:
            await response.read()
            return response.status

    before = console.held
    tasks = [asyncio.create_task(one(sources[i % len(sources)])) for i in range(count)]
    await until(lambda: console.held == before + count, f"{count} requests at the console")
    try:
        yield tasks
    finally:
        console.release.set()
        assert await asyncio.wait_for(asyncio.gather(*tasks), 10) == [200] * count
        console.release.clear()


async def get(
    session: aiohttp.ClientSession, url: str, source: str = "192.0.2.1"
) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    async with session.get(url, headers={"X-Forwarded-For": source}) as response:
        await response.read()
        return response.status, dict(response.headers), time.monotonic() - started


# --- the pool's deadline ------------------------------------------------------------------


async def test_a_full_pool_answers_503_at_pool_timeout_and_frees_up(
    serve_sidecar: ServeFactory,
) -> None:
    app = console_app()
    served = await serve_sidecar(
        app, **TRUSTED, upstream={"max_connections": 2, "pool_timeout": "1s"}
    )
    console = app[SEEN]
    async with aiohttp.ClientSession() as session:
        async with holding(
            session, served.url("/hold"), 2, console, sources=["192.0.2.1", "192.0.2.2"]
        ):
            status, headers, took = await get(session, served.url("/"), "192.0.2.3")
            assert (status, headers["Retry-After"]) == (503, str(BUSY_RETRY_AFTER))
            assert 0.9 < took < 5, took  # waited for a free connection, then gave up
            assert errors(served, "pool") == 1
            assert errors(served, "timeout") == 0  # not the console's fault
            # A request that is waiting when a connection frees gets it.
            waiting = asyncio.create_task(get(session, served.url("/"), "192.0.2.3"))
            await asyncio.sleep(0.2)
        status, _, _ = await asyncio.wait_for(waiting, 10)
        assert status == 200
        assert transport(served).requests == 0


async def test_the_pool_wait_is_the_decision_upstream_error(serve_sidecar: ServeFactory) -> None:
    app = console_app()
    served = await serve_sidecar(app, upstream={"max_connections": 1, "pool_timeout": "0.3s"})
    metrics: Metrics = served.app[METRICS]
    async with aiohttp.ClientSession() as session:
        async with holding(session, served.url("/hold"), 1, app[SEEN], sources=["x"]):
            status, _, _ = await get(session, served.url("/"))
    assert status == 503
    assert metrics.requests_total.labels("upstream_error")._value.get() == 1


# --- per client ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("holders", "refused_source", "other_source"),
    [
        pytest.param(["198.51.100.7"], "198.51.100.7", "198.51.100.8", id="ipv4 address"),
        pytest.param(
            ["2001:db8:66:66::1", "2001:db8:66:66:ffff::2"],
            "2001:db8:66:66::3",
            "2001:db8:66:67::1",
            id="ipv6 /64",
        ),
    ],
)
async def test_one_client_cannot_take_more_than_its_share_of_the_pool(
    serve_sidecar: ServeFactory, holders: list[str], refused_source: str, other_source: str
) -> None:
    app = console_app()
    served = await serve_sidecar(
        app,
        **TRUSTED,
        upstream={"max_connections": 10, "max_requests_per_client": 2, "pool_timeout": "5s"},
    )
    async with aiohttp.ClientSession() as session:
        async with holding(session, served.url("/hold"), 2, app[SEEN], sources=holders):
            status, headers, took = await get(session, served.url("/"), refused_source)
            assert (status, headers["Retry-After"]) == (503, str(BUSY_RETRY_AFTER))
            assert took < 2  # refused at once, never queued
            assert errors(served, "per_client") == 1
            # Everyone else still has the rest of the pool.
            assert (await get(session, served.url("/"), other_source))[0] == 200
        # Once its requests are answered, the client has its share back.
        assert (await get(session, served.url("/"), refused_source))[0] == 200


async def test_a_refused_upload_closes_its_connection(serve_sidecar: ServeFactory) -> None:
    """The body of a request refused for the per-client cap was never read: the connection
    cannot carry another request."""
    app = console_app()
    served = await serve_sidecar(app, upstream={"max_requests_per_client": 1})
    async with aiohttp.ClientSession() as session:
        async with holding(session, served.url("/hold"), 1, app[SEEN], sources=["x"]):
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: console\r\nContent-Length: 100000\r\n\r\nxx"
            )
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.close()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"Connection: close" in answer
    assert app[SEEN].uploads == []


# --- WebSockets ---------------------------------------------------------------------------


async def test_websockets_never_take_the_connections_pages_need(
    serve_sidecar: ServeFactory,
) -> None:
    app = console_app()
    served = await serve_sidecar(app, upstream={"max_connections": 1, "pool_timeout": "0.5s"})
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(served.url("/live")) for _ in range(5)]
        try:
            assert (await get(session, served.url("/")))[0] == 200
            assert transport(served).websockets == 5
        finally:
            for ws in sockets:
                await ws.close()
    await until(lambda: transport(served).websockets == 0, "WebSockets counted out")


async def test_websockets_over_max_websockets_get_503(serve_sidecar: ServeFactory) -> None:
    app = console_app()
    served = await serve_sidecar(app, **TRUSTED, upstream={"max_websockets": 2})
    async with aiohttp.ClientSession() as session:
        first = await session.ws_connect(
            served.url("/live"), headers={"X-Forwarded-For": "192.0.2.1"}
        )
        second = await session.ws_connect(
            served.url("/live"), headers={"X-Forwarded-For": "192.0.2.2"}
        )
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
            await session.ws_connect(served.url("/live"), headers={"X-Forwarded-For": "192.0.2.3"})
        assert refused_ws.value.status == 503
        assert refused_ws.value.headers is not None
        assert refused_ws.value.headers["Retry-After"] == str(BUSY_RETRY_AFTER)
        assert errors(served, "websockets") == 1
        assert app[SEEN].websockets == 2  # the refused one never reached the console
        await first.close()
        await until(lambda: transport(served).websockets == 1, "a WebSocket counted out")
        third = await session.ws_connect(
            served.url("/live"), headers={"X-Forwarded-For": "192.0.2.3"}
        )
        await third.send_str("hello")
        assert (await third.receive(timeout=5)).data == "hello"
        await second.close()
        await third.close()


async def test_one_client_cannot_take_every_websocket(serve_sidecar: ServeFactory) -> None:
    app = console_app()
    served = await serve_sidecar(
        app, **TRUSTED, upstream={"max_websockets": 10, "max_websockets_per_client": 2}
    )
    async with aiohttp.ClientSession() as session:

        async def connect(source: str) -> aiohttp.ClientWebSocketResponse:
            return await session.ws_connect(
                served.url("/live"), headers={"X-Forwarded-For": source}
            )

        mine = [await connect("2001:db8::1"), await connect("2001:db8::2")]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
            await connect("2001:db8::3")  # the same /64
        assert refused_ws.value.status == 503
        other = await connect("2001:db8:1::1")
        # The per-client count is apart from the requests': pages still load.
        assert (await get(session, served.url("/"), "2001:db8::1"))[0] == 200
        for ws in [*mine, other]:
            await ws.close()
        await until(lambda: transport(served).websockets == 0, "WebSockets counted out")
        again = await connect("2001:db8::3")
        await again.close()


# --- request bodies -----------------------------------------------------------------------


async def test_a_body_that_stops_gets_408_and_frees_the_upstream_connection(
    serve_sidecar: ServeFactory,
) -> None:
    app = console_app()
    served = await serve_sidecar(app, listen={"body_timeout": "0.5s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: console\r\nContent-Length: 1000\r\n\r\n")
        writer.write(b"x" * 10)  # ...and nothing more
        await writer.drain()
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        took = time.monotonic() - started
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert b"Connection: close" in answer
    assert 0.4 < took < 5, took
    await until(lambda: bool(app[SEEN].uploads), "the console's read ended")
    assert app[SEEN].uploads[0].startswith("broken")  # never taken for a complete body
    assert transport(served).requests == 0
    assert refused(served, "body_timeout") == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_that_trickles_within_the_timeout_is_forwarded_whole(
    serve_sidecar: ServeFactory, framing: str
) -> None:
    app = console_app()
    served = await serve_sidecar(app, listen={"body_timeout": "1.5s"})
    chunks = 12
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        head = b"POST /upload HTTP/1.1\r\nHost: console\r\n"
        if framing == "chunked":
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            writer.write(head + b"Content-Length: %d\r\n\r\n" % (chunks * 10))
        for _ in range(chunks):  # 12 x 0.25 s = 3 s in all, twice the timeout
            writer.write(b"a\r\n" + b"x" * 10 + b"\r\n" if framing == "chunked" else b"x" * 10)
            await writer.drain()
            await asyncio.sleep(0.25)
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"got 120 bytes"), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert refused(served, "body_timeout") == 0
