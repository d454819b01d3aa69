"""Shared pieces for MFA tests: a stub console, a sidecar in front of it, MFA helpers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyotp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from sidecar.app import build_app
from tests.conftest import make_config

USERS = {
    "alice": {"id": "u-alice", "email": "alice@example.com", "role": "owner"},
    "bob": {"id": "u-bob", "email": "bob@example.com", "role": "admin"},
    "carol": {"id": "u-carol", "email": "carol@example.com", "role": "member"},
}
Hits = web.AppKey("hits", list[str])
Down = web.AppKey("down", list[bool])
Cookies = web.AppKey("cookies", list[str | None])

HTML = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}
XHR = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


def stub_console() -> web.Application:
    app = web.Application()
    app[Hits] = []
    app[Down] = [False]
    app[Cookies] = []

    async def me(request: web.Request) -> web.Response:
        if app[Down][0]:
            return web.Response(status=500)
        user = USERS.get(request.cookies.get("console", ""))
        auth = request.headers.get("Authorization", "")
        if user is None and auth.startswith("Bearer token-"):
            user = USERS.get(auth.removeprefix("Bearer token-"))
        if user is None:
            return web.json_response({"error": "unauthenticated"}, status=401)
        return web.json_response(user)

    async def page(request: web.Request) -> web.Response:
        app[Hits].append(request.path)
        app[Cookies].append(request.headers.get("Cookie"))
        return web.Response(text=f"console page {request.path}")

    app.router.add_get("/api/me", me)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def console(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(stub_console())


@pytest.fixture
def sidecar(
    tmp_path: Path,
    console: TestServer,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> Callable[..., Awaitable[Client]]:
    async def factory(**sections: Any) -> Client:
        config = make_config(tmp_path, f"http://127.0.0.1:{console.port}", **sections)
        return await aiohttp_client(build_app(config))

    return factory


def login(client: Client, user: str) -> None:
    client.session.cookie_jar.update_cookies({"console": user}, URL(str(client.make_url("/"))))


def hits(console: TestServer) -> list[str]:
    return console.app[Hits]


async def csrf(client: Client) -> str:
    status = await (await client.get("/mfa/api/status")).json()
    token: str = status["csrf_token"]
    return token


async def enroll_totp(client: Client) -> tuple[str, list[str]]:
    token = await csrf(client)
    begun = await client.post("/mfa/api/totp/begin", headers={"X-CSRF-Token": token})
    assert begun.status == 200, await begun.text()
    secret = (await begun.json())["secret"]
    finished = await client.post(
        "/mfa/api/totp/finish",
        json={"code": pyotp.TOTP(secret).now()},
        headers={"X-CSRF-Token": token},
    )
    assert finished.status == 200, await finished.text()
    body = await finished.json()
    return secret, body["recovery_codes"]


def next_code(secret: str) -> str:
    """The code of the next time step: accepted (valid_window=1) and never used before."""
    return pyotp.TOTP(secret).at(time.time() + 30)
