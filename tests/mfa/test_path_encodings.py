"""Escapes that other servers decode, end to end: the whole sidecar in front of a stub console.

An exempt path spelled with an escape some server decodes into ``..``, ``/``, ``\\`` or NUL is
not exempt: it faces the MFA gate. A path that some server reads as the sidecar's prefix is
never forwarded to the console, whoever asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.mfa.support import XHR, Client, hits, login

ALL_NO_GRACE = {"security": {"mfa_policy": "all", "grace_period": "0s"}}


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/static/%C0%AE%C0%AE/settings", id="overlong dots"),
        pytest.param("/static/..%C0%AFsettings", id="overlong slash"),
        pytest.param("/static/%E0%80%AE%E0%80%AE/settings", id="3-byte overlong dots"),
        pytest.param("/static/..%C1%9Csettings", id="overlong backslash"),
        pytest.param("/static/%u002e%u002e/settings", id="IIS %u dots"),
        pytest.param("/static/..%u2215settings", id="IIS %u division slash"),
        pytest.param("/static/app.js%00/../../settings", id="NUL"),
        pytest.param("/logout%00", id="NUL after /logout"),
        pytest.param("/static/%EF%BC%8E%EF%BC%8E/settings", id="fullwidth dots"),
        pytest.param("/static/..%EF%BC%8Fsettings", id="fullwidth slash"),
        pytest.param("/static/%E2%80%A5/settings", id="two dot leader"),
        pytest.param("/static/..%E2%88%95settings", id="division slash"),
        pytest.param("/static/..%20/settings", id="dot-dot space"),
        pytest.param("/static/.../settings", id="three dots"),
    ],
)
async def test_escapes_out_of_an_exemption_face_the_gate(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer, path: str
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "carol")
    assert (await client.get("/static/app.css", headers=XHR)).status == 200  # exempt
    assert hits(console) == ["/static/app.css"]

    response = await client.get(URL(path, encoded=True), headers=XHR, allow_redirects=False)
    assert response.status == 403
    assert (await response.json())["error"] == "mfa_setup_required"
    assert hits(console) == ["/static/app.css"]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/mfa%C0%AFsetup", id="overlong slash"),
        pytest.param("/x/%C0%AE%C0%AE/mfa/setup", id="overlong dots"),
        pytest.param("/mfa%u002fsetup", id="IIS %u slash"),
        pytest.param("/%u006dfa/setup", id="IIS %u letter"),
        pytest.param("/%EF%BD%8Dfa/setup", id="fullwidth letter"),
        pytest.param("/mfa%EF%BC%8Fsetup", id="fullwidth slash"),
        pytest.param("/x/%E2%80%A5/mfa", id="two dot leader"),
        pytest.param("/mfa%00", id="NUL"),
        pytest.param("/mfa%3Fx", id="decoded ?"),
        pytest.param("/mfa;x/setup", id="; parameter"),
        pytest.param("/mfa./setup", id="trailing dot"),
        pytest.param("/MFA/setup", id="upper case"),
        pytest.param("/mfa\\setup", id="backslash"),
        pytest.param("/mfa%2Fsetup", id="%2F"),
        pytest.param("/mfa%2F..%2Fsettings", id="%2F with dots out of it"),
        pytest.param("/x/..%2Fmfa/setup", id="%2F with dots into it"),
    ],
)
@pytest.mark.parametrize("who", ["anonymous", "carol"])
async def test_nothing_a_server_reads_under_the_prefix_reaches_the_console(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer, path: str, who: str
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    if who != "anonymous":
        login(client, who)
    response = await client.get(URL(path, encoded=True), headers=XHR, allow_redirects=False)
    # Anonymous: refused by the proxy (404). Carol: by the MFA gate (403) or, when aiohttp's
    # own reading is under the prefix, by the proxy.
    assert response.status in ((404,) if who == "anonymous" else (403, 404))
    assert hits(console) == []


@pytest.mark.parametrize("path", ["/mfa-guide", "/docs/mfa", "/docs/mfa/caf%C3%A9", "/mfax"])
async def test_console_paths_that_merely_look_alike_are_forwarded(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer, path: str
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    response = await client.get(URL(path, encoded=True), headers=XHR)
    assert response.status == 200
    assert len(hits(console)) == 1


@pytest.mark.parametrize(
    "target",
    [b"/static/\xef\xbc\x8e\xef\xbc\x8e/settings", b"/static/\xc0\xae\xc0\xae/x", b"/mfa\x00"],
)
async def test_raw_non_ascii_never_gets_past_the_parser(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer, target: bytes
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nCookie: console=carol\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    assert hits(console) == []
