"""The public listener's guard over real sockets: the head deadline and the connection caps.

Each test opens raw TCP connections to a sidecar served exactly as ``sidecar run`` serves it
(``sidecar.server.public_runner``), on asyncio's event loop and on uvloop, and asserts what a
client sees: a 408, a 503, a closed connection, or an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import METRICS, UPSTREAM, apply_config
from sidecar.listener import ConnectionCounts, _GuardedHandler, raise_open_files_limit
from sidecar.net import parse_ip
from sidecar.proxy import AiohttpUpstream
from tests.conftest import Served, ServeFactory, make_config
from tests.process import run_sidecar
from tests.test_operations import children, metric, wait_for

both_loops = pytest.mark.both_loops

SHORT = {"listen": {"header_timeout": "0.5s"}}
REQUEST = b"GET /page HTTP/1.1\r\nHost: localhost\r\n\r\n"


def console() -> web.Application:
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"console read {len(await request.read())} bytes")

    app.router.add_route("*", "/{tail:.*}", page)
    return app


@dataclass
class Listener:
    """A served sidecar, seen from raw sockets."""

    served: Served
    tmp_path: Path

    @property
    def app(self) -> web.Application:
        return self.served.app

    def refused(self, reason: str) -> float:
        value: float = self.app[METRICS].connections_refused_total.labels(reason)._value.get()
        return value

    def open_connections(self) -> float:
        value: float = self.app[METRICS].open_connections._value.get()
        return value

    async def connect(
        self, source: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.served.port, local_addr=(source, 0))

    async def until_open(self, count: int) -> None:
        """Wait (bounded) until the listener has noticed connections opening or closing."""
        counts = self.served.runner.guard.counts
        for _ in range(200):
            if counts.total == count:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"{counts.total} open, expected {count}")


Start = Callable[..., Awaitable[Listener]]


@pytest.fixture
def listener(serve_sidecar: ServeFactory, tmp_path: Path) -> Start:
    async def start(**sections: Any) -> Listener:
        return Listener(await serve_sidecar(console(), **sections), tmp_path)

    return start


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the sidecar closes the connection (bounded: a hang fails the test)."""
    return await asyncio.wait_for(reader.read(), 10)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


async def trickle(writer: asyncio.StreamWriter, lines: int = 200) -> None:
    """A header line every 0.1 s: never a complete head, always some progress."""
    with contextlib.suppress(ConnectionError):
        for i in range(lines):
            writer.write(b"X-Slow-%d: yes\r\n" % i)
            await writer.drain()
            await asyncio.sleep(0.1)


# --- the head deadline ----------------------------------------------------------------------


@both_loops
async def test_a_connection_that_sends_nothing_is_closed_silently(listener: Start) -> None:
    sidecar = await listener(**SHORT)
    reader, writer = await sidecar.connect()
    assert await read_all(reader) == b""  # no 408: a browser's pre-connection is not an error
    assert sidecar.refused("header_timeout") == 1
    await sidecar.until_open(0)
    writer.close()


@both_loops
async def test_a_trickled_head_gets_408_and_is_closed(listener: Start) -> None:
    sidecar = await listener(**SHORT)
    reader, writer = await sidecar.connect()
    writer.write(b"GET /page HTTP/1.1\r\nHost: localhost\r\n")
    slow = asyncio.ensure_future(trickle(writer))
    try:
        answer = await read_all(reader)
    finally:
        slow.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"\r\nConnection: close\r\n" in answer
    assert sidecar.refused("header_timeout") == 1


@both_loops
async def test_a_kept_alive_connection_may_idle_past_the_header_timeout(
    listener: Start,
) -> None:
    sidecar = await listener(**SHORT)
    reader, writer = await sidecar.connect()
    writer.write(REQUEST)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    await asyncio.sleep(1.5)  # three header timeouts, idle: keep-alive applies, not the deadline
    writer.write(REQUEST)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    assert sidecar.refused("header_timeout") == 0
    writer.close()


@both_loops
async def test_a_later_head_trickled_on_a_kept_alive_connection_gets_408(
    listener: Start,
) -> None:
    sidecar = await listener(**SHORT)
    reader, writer = await sidecar.connect()
    writer.write(REQUEST)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    await asyncio.sleep(1.0)  # idle first: the deadline starts with the next head's first byte
    writer.write(b"GET /page HTTP/1.1\r\n")
    slow = asyncio.ensure_future(trickle(writer))
    try:
        answer = await read_all(reader)
    finally:
        slow.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


@both_loops
async def test_a_slow_body_after_a_complete_head_is_not_cut_off(listener: Start) -> None:
    sidecar = await listener(**SHORT)
    reader, writer = await sidecar.connect()
    writer.write(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 15\r\n\r\n")
    for _ in range(15):  # 1.5 s of body, three header timeouts
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.1)
    answer = await read_response(reader)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"console read 15 bytes")
    assert sidecar.refused("header_timeout") == 0
    writer.close()


@both_loops
async def test_many_silent_connections_are_all_closed(listener: Start) -> None:
    sidecar = await listener(**SHORT)
    connections = [await sidecar.connect() for _ in range(50)]
    answers = await asyncio.gather(*(read_all(reader) for reader, _ in connections))
    assert answers == [b""] * 50
    assert sidecar.refused("header_timeout") == 50
    await sidecar.until_open(0)
    for _, writer in connections:
        writer.close()


# --- connection caps ------------------------------------------------------------------------

CAPS = {
    "listen": {"header_timeout": "30s", "max_connections": 6, "max_connections_per_address": 3},
    "network": {"trusted_proxies": ["127.0.0.2/32"]},
}
FROM_BALANCER = b"GET /page HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"


@both_loops
async def test_one_address_over_its_cap_gets_503_and_a_trusted_proxy_does_not(
    listener: Start,
) -> None:
    sidecar = await listener(**CAPS)
    held = [await sidecar.connect("127.0.0.1") for _ in range(3)]
    await sidecar.until_open(3)
    reader, writer = await sidecar.connect("127.0.0.1")
    answer = await read_all(reader)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nConnection: close\r\n" in answer
    assert sidecar.refused("per_address") == 1
    writer.close()
    # The balancer is not counted against a per-address cap: four connections, all served.
    balancer = [await sidecar.connect("127.0.0.2") for _ in range(3)]
    for reader, writer in balancer:
        writer.write(FROM_BALANCER)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    # One address's slot is free again once one of its connections closes.
    held[0][1].close()
    await sidecar.until_open(5)
    reader, writer = await sidecar.connect("127.0.0.1")
    writer.write(REQUEST)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    assert sidecar.refused("per_address") == 1
    for _, w in [*held, *balancer, (reader, writer)]:
        w.close()


@both_loops
async def test_the_total_cap_applies_to_everyone_including_trusted_proxies(
    listener: Start,
) -> None:
    sidecar = await listener(**CAPS)
    held = [await sidecar.connect(source) for source in ["127.0.0.1"] * 3 + ["127.0.0.2"] * 3]
    await sidecar.until_open(6)
    for source in ("127.0.0.2", "127.0.0.3"):
        reader, writer = await sidecar.connect(source)
        assert (await read_all(reader)).startswith(b"HTTP/1.1 503 ")
        writer.close()
    assert sidecar.refused("total") == 2
    assert sidecar.open_connections() == 6
    for _, writer in held:
        writer.close()
    await sidecar.until_open(0)
    assert sidecar.open_connections() == 0


@both_loops
async def test_a_reload_applies_new_caps_to_new_connections(listener: Start) -> None:
    sidecar = await listener(**CAPS)
    held = [await sidecar.connect() for _ in range(2)]
    await sidecar.until_open(2)
    lower = make_config(
        sidecar.tmp_path,
        sidecar.served.upstream_url,
        listen={"header_timeout": "0.5s", "max_connections_per_address": 2},
    )
    restart = await apply_config(sidecar.app, lower)
    assert not [key for key in restart if key.startswith("listen")]
    reader, writer = await sidecar.connect()
    assert (await read_all(reader)).startswith(b"HTTP/1.1 503 ")
    # The two held connections keep their deadline; new ones get the shorter one.
    assert sidecar.refused("header_timeout") == 0
    writer.close()
    for _, w in held:
        w.close()
    await sidecar.until_open(0)
    reader, writer = await sidecar.connect()
    assert await read_all(reader) == b""
    assert sidecar.refused("header_timeout") == 1
    writer.close()


# --- the send deadline ----------------------------------------------------------------------

CHUNK = b"x" * 65536


@dataclass
class Sender:
    """A console that sends: what it sent, and whether its sending was cut off."""

    sent: int = 0
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


SENDER = web.AppKey("sender", Sender)


def sending_console() -> web.Application:
    """``/stream``: an answer without end (a long export); ``/download/N``: N bytes;
    ``/ws``: a WebSocket that sends without end from the start."""
    app = web.Application()
    app[SENDER] = sender = Sender()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(CHUNK)
                sender.sent += len(CHUNK)
        finally:  # the sidecar let go of the connection: the write fails or is cancelled
            sender.stopped.set()

    async def download(request: web.Request) -> web.Response:
        return web.Response(body=b"y" * int(request.match_info["size"]))

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)

        async def send() -> None:
            while not socket.closed:
                await socket.send_bytes(CHUNK)
                sender.sent += len(CHUNK)

        sending = asyncio.create_task(send())
        try:
            async for _ in socket:  # reading, as consoles do: a close is answered
                pass
        finally:
            sending.cancel()
            sender.stopped.set()
        return socket

    app.router.add_get("/stream", stream)
    app.router.add_get("/download/{size}", download)
    app.router.add_get("/ws", ws)
    return app


async def non_reading_client(port: int, request: bytes) -> socket.socket:
    """A client that sends ``request`` and then never reads (a small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    return sock


def send_refusals(served: Served) -> float:
    value: float = served.app[METRICS].connections_refused_total.labels("send_timeout")._value.get()
    return value


WEBSOCKET_HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@both_loops
@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n", id="an answer"),
        pytest.param(WEBSOCKET_HANDSHAKE, id="a WebSocket"),
    ],
)
async def test_a_client_that_stops_reading_is_cut_off_and_frees_the_upstream(
    serve_sidecar: ServeFactory, request_bytes: bytes
) -> None:
    console = sending_console()
    served = await serve_sidecar(console, listen={"send_timeout": "0.5s"})
    sock = await non_reading_client(served.port, request_bytes)
    try:
        # The sidecar gives up on the client, so the console's connection is let go of too.
        await asyncio.wait_for(console[SENDER].stopped.wait(), 15)
        assert send_refusals(served) == 1
        upstream = served.app[UPSTREAM]
        assert isinstance(upstream, AiohttpUpstream)
        for _ in range(200):
            if (upstream.requests, upstream.websockets) == (0, 0):
                break
            await asyncio.sleep(0.025)
        assert (upstream.requests, upstream.websockets) == (0, 0)
        await asyncio.sleep(0)
        assert served.runner.guard.counts.total == 0  # the client's connection is gone
    finally:
        sock.close()


@both_loops
async def test_a_client_that_reads_slowly_but_steadily_is_not_cut_off(
    serve_sidecar: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each period the client takes less than the transport's flow-control window (it stays
    paused), but it takes something: a new period starts, the download completes."""
    checks: list[int] = []
    deadline_passed = _GuardedHandler._send_deadline_passed

    def counted(self: _GuardedHandler) -> None:
        checks.append(1)
        deadline_passed(self)

    monkeypatch.setattr(_GuardedHandler, "_send_deadline_passed", counted)
    size = 16 * 1024 * 1024  # more than the kernel's socket buffers hold on the way
    served = await serve_sidecar(sending_console(), listen={"send_timeout": "1s"})
    sock = await non_reading_client(
        served.port, b"GET /download/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size
    )
    loop = asyncio.get_running_loop()

    async def take(count: int) -> bytes:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, count), 10)
        assert chunk, "cut off"
        return chunk

    received = b""
    try:
        await asyncio.sleep(0.5)  # every buffer on the way fills up: the sidecar waits
        slow_until = time.monotonic() + 3
        while time.monotonic() < slow_until:  # 3 periods of 8 KiB every 0.1 s
            received += await take(8192)
            await asyncio.sleep(0.1)
        while len(received) < size + 100:  # then the rest, at full speed
            received += await take(65536)
            if received.endswith(b"y" * 100) and len(received.partition(b"\r\n\r\n")[2]) >= size:
                break
    finally:
        sock.close()
    assert received.partition(b"\r\n\r\n")[2] == b"y" * size
    assert send_refusals(served) == 0
    assert checks, "the send deadline never came up: the test proves nothing"


# --- pure parts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 1.0
    max_connections: int = 3
    max_connections_per_address: int = 2


A, B = parse_ip("192.0.2.1"), parse_ip("2001:db8::1")
A2 = parse_ip("192.0.2.2")  # A's neighbour: IPv4 counts address by address
B2 = parse_ip("2001:db8::ffff:ffff:ffff:fffe")  # in B's /64
B3 = parse_ip("2001:db8:0:1::1")  # the next /64
MAPPED_A = ipaddress.IPv6Address("::ffff:192.0.2.1")  # A as a dual-stack socket reports it


@pytest.mark.parametrize(
    ("opened", "trusted", "address", "exempt", "expected"),
    [
        pytest.param([], [], A, False, None, id="first"),
        pytest.param([A], [], A, False, None, id="second from one address"),
        pytest.param([A, A], [], A, False, "per_address", id="third from one address"),
        pytest.param([A, A], [], MAPPED_A, False, "per_address", id="third, IPv4-mapped"),
        pytest.param([A, A], [], A, True, None, id="third from a trusted proxy"),
        pytest.param([A, A], [], B, False, None, id="another address"),
        pytest.param([A, A], [], A2, False, None, id="the next IPv4 address"),
        pytest.param([B, B2], [], B, False, "per_address", id="third from one IPv6 /64"),
        pytest.param([B, B2], [], B3, False, None, id="the next IPv6 /64"),
        pytest.param([], [B, B], B2, False, None, id="a trusted proxy's /64 neighbour"),
        pytest.param([A, A, B], [], B, True, "total", id="total applies to trusted proxies"),
        pytest.param([A, B], [], None, False, None, id="unknown peer"),
    ],
)
def test_admission(
    opened: list[Any], trusted: list[Any], address: Any, exempt: bool, expected: str | None
) -> None:
    counts = ConnectionCounts()
    for each in opened:
        assert counts.admit(each, exempt=False, limits=Limits()) is None
    for each in trusted:
        assert counts.admit(each, exempt=True, limits=Limits()) is None
    assert counts.admit(address, exempt=exempt, limits=Limits()) == expected
    assert counts.total == len(opened) + len(trusted) + (expected is None)


def test_released_connections_free_their_slots() -> None:
    counts = ConnectionCounts()
    for _ in range(2):
        assert counts.admit(A, exempt=False, limits=Limits()) is None
    counts.release(A)
    assert counts.from_address(A) == 1
    assert counts.admit(A, exempt=False, limits=Limits()) is None
    counts.release(A)
    counts.release(A)
    assert (counts.total, counts.from_address(A)) == (0, 0)


def test_released_ipv6_connections_free_their_slot_of_the_64() -> None:
    counts = ConnectionCounts()
    assert counts.admit(B, exempt=False, limits=Limits()) is None
    assert counts.admit(B2, exempt=False, limits=Limits()) is None
    assert counts.admit(B, exempt=True, limits=Limits()) is None  # B became a trusted proxy
    assert counts.from_address(B3) == 0
    assert counts.from_address(B) == counts.from_address(B2) == 2
    counts.release(B2)
    counts.release(B, exempt=True)
    assert (counts.total, counts.from_address(B)) == (1, 1)
    counts.release(B)
    assert (counts.total, counts.from_address(B2)) == (0, 0)


def test_open_files_limit_is_raised_to_the_hard_limit(caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip("needs a finite hard limit on open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard // 2), hard))
    try:
        with caplog.at_level(logging.INFO, logger="sidecar.listener"):
            assert raise_open_files_limit(needed=hard // 4) == hard
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            raise_open_files_limit(needed=hard + 1)
        warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
        assert "lower listen.max_connections" in warning.getMessage()
        assert warning.fields == {"open_files_limit": hard, "needed": hard + 1}  # type: ignore[attr-defined]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- as `sidecar run` runs it: uvloop, several workers ----------------------------------------


def memory_map(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
async def test_each_worker_enforces_the_caps_and_the_deadline(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream = await aiohttp_server(console())
    with run_sidecar(
        tmp_path,
        f"http://127.0.0.1:{upstream.port}",
        workers=2,
        listen={"header_timeout": "1s", "max_connections_per_address": 3},
        logging={"level": "info"},
    ) as sidecar:

        async def two_workers() -> bool:
            return len(children(sidecar.proc.pid)) == 2

        await wait_for(two_workers, 20)
        if importlib.util.find_spec("uvloop") is not None:  # uvloop, when installed, serves
            for worker in children(sidecar.proc.pid):
                assert "uvloop/loop." in memory_map(worker)
        connections = [await asyncio.open_connection("127.0.0.1", sidecar.port) for _ in range(12)]
        answers = await asyncio.gather(*(read_all(reader) for reader, _ in connections))
        for _, writer in connections:
            writer.close()
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
        timed_out = [a for a in answers if a == b""]
        # Three per worker at most were admitted, and each was closed by its worker's
        # deadline; the kernel spreads connections over the workers as it likes.
        assert len(refused) + len(timed_out) == 12
        assert 3 <= len(timed_out) <= 6
        total = 'sidecar_connections_refused_total{reason="%s"}'
        assert await metric(sidecar, total % "per_address") == len(refused)
        assert await metric(sidecar, total % "header_timeout") == len(timed_out)
        assert await metric(sidecar, total % "total") == 0
    log = (tmp_path / "sidecar.log").read_text()
    assert '"msg":"open files limit"' in log
    assert "Traceback" not in log
