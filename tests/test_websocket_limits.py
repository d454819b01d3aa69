"""WebSocket relaying in bounded memory: no compression on either leg, a size cap per message.

A permessage-deflate frame of 64 KiB inflates to 64 MiB; a frame header can announce any
length. Each test sends what an attacker would and asserts what the client and the console
see: the close code, and that the refused message never reached the other side. The sidecar
is served as ``sidecar run`` serves it, so the relay's own close path runs (the test
client's server would cancel the handler when the client's connection drops).
"""

from __future__ import annotations

import asyncio
import os
import zlib
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from sidecar.proxy import close_code_for_peer
from tests.conftest import ServeFactory

CAP = 64 * 1024
LIMITS = {"upstream": {"websocket_max_message": "64KiB"}}


@dataclass
class Console:
    """What the stub console saw: its handshake headers, the messages, its close code."""

    extensions: list[str] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    close_code: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


Seen = web.AppKey("seen", Console)


def console_app() -> web.Application:
    """``send N`` makes the console send N bytes; ``deflate N`` sends N zero bytes as one
    compressed frame although nothing was negotiated; anything else is recorded by size."""
    app = web.Application()
    app[Seen] = Console()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        seen = app[Seen]
        seen.extensions = request.headers.getall("Sec-WebSocket-Extensions", [])
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT and msg.data.startswith("send "):
                    await ws.send_bytes(b"x" * int(msg.data[5:]))
                elif msg.type is WSMsgType.TEXT and msg.data.startswith("deflate "):
                    await ws.send_bytes(bytes(int(msg.data[8:])), compress=15)
                elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    seen.received.append(len(msg.data))
        finally:
            seen.close_code = ws.close_code
            seen.done.set()
        return ws

    app.router.add_get("/ws", handler)
    return app


async def console_closed(app: web.Application) -> int | None:
    await asyncio.wait_for(app[Seen].done.wait(), 10)
    return app[Seen].close_code


# --- raw frames, as a hostile client writes them -------------------------------------------


def client_frame(
    payload: bytes, *, opcode: int = 0x2, rsv1: bool = False, declared: int | None = None
) -> bytes:
    """One masked client frame; ``declared`` announces another length than is sent."""
    length = len(payload) if declared is None else declared
    head = bytes([0x80 | (0x40 if rsv1 else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of one unmasked server frame."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await reader.readexactly(length)


async def raw_upgrade(
    port: int, *, extensions: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: " + extensions.encode() + b"\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head.split(b"\r\n")


async def close_frame_code(reader: asyncio.StreamReader) -> int:
    opcode, payload = await asyncio.wait_for(read_frame(reader), 10)
    assert opcode == 0x8, f"expected a close frame, got opcode {opcode}"
    return int.from_bytes(payload[:2], "big")


def deflated_zeros(size: int) -> bytes:
    """``size`` zero bytes as a permessage-deflate payload (raw deflate, trailer removed)."""
    compressor = zlib.compressobj(wbits=-15)
    return (compressor.compress(bytes(size)) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


# --- compression is never negotiated, never inflated ----------------------------------------


async def test_deflate_offered_by_the_client_is_not_negotiated_on_either_leg(
    serve_sidecar: ServeFactory,
) -> None:
    console = console_app()
    client = await serve_sidecar(console)
    _, writer, head = await raw_upgrade(
        client.port, extensions="permessage-deflate; client_max_window_bits"
    )
    try:
        assert head[0].startswith(b"HTTP/1.1 101")
        assert not [h for h in head if h.lower().startswith(b"sec-websocket-extensions")]
        assert console[Seen].extensions == []
    finally:
        writer.close()


async def test_a_compressed_frame_from_the_client_is_refused_not_inflated(
    serve_sidecar: ServeFactory,
) -> None:
    console = console_app()
    client = await serve_sidecar(console)
    bomb = deflated_zeros(64 * 1024**2)  # 64 MiB of zeros in about 64 KiB
    assert len(bomb) < 100 * 1024
    reader, writer, head = await raw_upgrade(client.port, extensions="permessage-deflate")
    try:
        assert head[0].startswith(b"HTTP/1.1 101")
        writer.write(client_frame(bomb, rsv1=True))
        assert await close_frame_code(reader) == 1002  # protocol error: RSV1 not negotiated
        assert await console_closed(console) == 1001
        assert console[Seen].received == []
    finally:
        writer.close()


async def test_a_compressed_frame_from_the_console_is_refused_not_inflated(
    serve_sidecar: ServeFactory,
) -> None:
    console = console_app()
    client = await serve_sidecar(console)
    async with aiohttp.ClientSession() as session, session.ws_connect(client.url("/ws")) as ws:
        await ws.send_str(f"deflate {64 * 1024**2}")
        closing = await ws.receive(timeout=10)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == 1014  # bad gateway: the console broke the protocol
    assert await console_closed(console) == 1002


# --- a size cap per message, both directions ------------------------------------------------


async def test_a_message_of_exactly_the_cap_passes_both_ways(
    serve_sidecar: ServeFactory,
) -> None:
    console = console_app()
    client = await serve_sidecar(console, **LIMITS)
    async with aiohttp.ClientSession() as session, session.ws_connect(client.url("/ws")) as ws:
        await ws.send_bytes(b"y" * CAP)
        await ws.send_str(f"send {CAP}")
        answer = await ws.receive(timeout=10)
        assert answer.type is WSMsgType.BINARY
        assert len(answer.data) == CAP
    assert console[Seen].received == [CAP]


@pytest.mark.parametrize("kind", ["binary", "text", "fragmented"])
async def test_a_client_message_over_the_cap_closes_with_1009_and_never_reaches_the_console(
    serve_sidecar: ServeFactory, kind: str
) -> None:
    console = console_app()
    client = await serve_sidecar(console, **LIMITS)
    reader, writer, head = await raw_upgrade(client.port, extensions="x-none")
    try:
        assert head[0].startswith(b"HTTP/1.1 101")
        if kind == "binary":
            writer.write(client_frame(b"y" * (CAP + 1)))
        elif kind == "text":
            writer.write(client_frame(b"y" * (CAP + 1), opcode=0x1))
        else:
            # Two fragments under the cap each, over it together: the sum is what counts.
            half = b"y" * (CAP // 2 + 1)
            writer.write(_fragment(half, first=True))
            writer.write(_fragment(half, first=False))
        assert await close_frame_code(reader) == 1009
        assert await console_closed(console) == 1001
        assert console[Seen].received == []
    finally:
        writer.close()


def _fragment(payload: bytes, *, first: bool) -> bytes:
    """A binary message split in two frames: the first without FIN, then a continuation."""
    frame = bytearray(client_frame(payload, opcode=0x2 if first else 0x0))
    if first:
        frame[0] &= 0x7F  # clear FIN
    return bytes(frame)


async def test_a_frame_announcing_4gib_is_refused_before_any_payload_is_buffered(
    serve_sidecar: ServeFactory,
) -> None:
    # Default cap (1 MiB): the header alone is refused; the client never sends the payload.
    console = console_app()
    client = await serve_sidecar(console)
    reader, writer, _ = await raw_upgrade(client.port, extensions="x-none")
    try:
        writer.write(client_frame(b"", declared=4 * 1024**3))
        assert await close_frame_code(reader) == 1009
        assert await console_closed(console) == 1001
    finally:
        writer.close()


async def test_a_console_message_over_the_cap_closes_both_sides_with_1009(
    serve_sidecar: ServeFactory,
) -> None:
    console = console_app()
    client = await serve_sidecar(console, **LIMITS)
    async with aiohttp.ClientSession() as session, session.ws_connect(client.url("/ws")) as ws:
        await ws.send_str(f"send {CAP + 1}")
        closing = await ws.receive(timeout=10)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == 1009
    assert await console_closed(console) == 1009


async def test_the_default_cap_is_1mib_not_the_body_size(
    serve_sidecar: ServeFactory,
) -> None:
    console = console_app()
    client = await serve_sidecar(console, listen={"max_body_size": "1GiB"})
    async with aiohttp.ClientSession() as session, session.ws_connect(client.url("/ws")) as ws:
        await ws.send_str(f"send {1024**2}")
        assert len((await ws.receive(timeout=10)).data) == 1024**2
        await ws.send_str(f"send {1024**2 + 1}")
        closing = await ws.receive(timeout=10)
        assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1009)


@pytest.mark.parametrize(
    ("error", "from_client", "code"),
    [
        pytest.param(aiohttp.WebSocketError(1009, "big"), True, 1001, id="client too big"),
        pytest.param(aiohttp.WebSocketError(1002, "rsv1"), True, 1001, id="client protocol"),
        pytest.param(None, True, 1001, id="client vanished"),
        pytest.param(aiohttp.WebSocketError(1009, "big"), False, 1009, id="console too big"),
        pytest.param(aiohttp.WebSocketError(1002, "rsv1"), False, 1014, id="console protocol"),
        pytest.param(ConnectionResetError(), False, 1014, id="console reset"),
        pytest.param(None, False, 1014, id="console vanished"),
    ],
)
def test_close_code_told_to_the_other_side(
    error: BaseException | None, from_client: bool, code: int
) -> None:
    assert close_code_for_peer(error, from_client=from_client) == code
