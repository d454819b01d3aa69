"""Relayed WebSockets are judged again while open: what ends a user's next request (a
denylisted or no longer allowlisted address, a verification past ``mfa.verify_every``, a
policy that now requires setup, the store out of reach) ends their open WebSockets too, and
nothing else does. Each test opens WebSockets through the sidecar as browsers would, changes
what the pipeline judges by, and asserts the close code and reason the client gets, what
the console is told, and that the others stay open.
"""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from yarl import URL

from sidecar.app import MFA, PROXY, SETTINGS, WEBSOCKET_REVIEW, build_app
from sidecar.mfa.service import MfaService
from sidecar.store.base import MfaState, StoreUnavailable
from sidecar.websocket_review import WebSocketReview
from tests.conftest import deep_merge, make_config
from tests.mfa.attack import Browser, Client

CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)


@dataclass
class Site:
    """A console with a WebSocket echo, behind a sidecar whose reviews run only when woken
    (settings changes) or called, so each test decides when one happens."""

    app: web.Application
    server: TestServer
    users: dict[str, dict[str, Any]]
    console_close_codes: list[int | None]
    make_client: Callable[[TestServer], Awaitable[Client]]
    clients: list[Client] = field(default_factory=list)

    @property
    def review(self) -> WebSocketReview:
        return self.app[WEBSOCKET_REVIEW]

    def add_user(self, login: str, user_id: str, role: str = "member") -> None:
        self.users[login] = {"id": user_id, "email": f"{login}@example.com", "role": role}

    async def browser(self, login: str | None, address: str = "198.51.100.7") -> Browser:
        client = await self.make_client(self.server)
        if login is not None:
            url = URL(str(client.make_url("/")))
            client.session.cookie_jar.update_cookies({"console": login}, url)
        return Browser(client, address)

    async def change(self, **change: Any) -> None:
        """Change the live security settings, as the Security page does."""
        settings = self.app[SETTINGS]
        current = settings.current
        assert current is not None
        values: dict[str, Any] = {
            "mfa_policy": current.mfa_policy,
            "grace_period_seconds": current.grace_period_seconds,
            "ip_allowlist": current.ip_allowlist,
            "ip_denylist": current.ip_denylist,
        }
        saved = await settings.change(
            **{**values, **change}, actor="u-admin", expected_version=current.version
        )
        assert saved is not None


def console_app(users: dict[str, dict[str, Any]], close_codes: list[int | None]) -> web.Application:
    app = web.Application()

    async def me(request: web.Request) -> web.Response:
        user = users.get(request.cookies.get("console", ""))
        if user is None:
            return web.json_response({"error": "unauthenticated"}, status=401)
        return web.json_response(user)

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for msg in socket:
            if msg.type is WSMsgType.TEXT:
                await socket.send_str(f"echo {msg.data}")
        close_codes.append(socket.close_code)
        return socket

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="console page")

    app.router.add_get("/api/me", me)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


SiteFactory = Callable[..., Awaitable[Site]]


@pytest.fixture
async def site(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> AsyncIterator[SiteFactory]:
    servers: list[TestServer] = []

    async def factory(**sections: Any) -> Site:
        users: dict[str, dict[str, Any]] = {}
        close_codes: list[int | None] = []
        console = await aiohttp_server(console_app(users, close_codes))
        config = make_config(
            tmp_path,
            f"http://127.0.0.1:{console.port}",
            **deep_merge({"network": {"trusted_proxies": ["127.0.0.1/32"]}}, sections),
        )
        app = build_app(config)
        app[WEBSOCKET_REVIEW].every = 3600.0  # only wakes (settings changes) and tests review
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return Site(app, server, users, close_codes, aiohttp_client)

    yield factory
    for server in servers:  # as a shutdown does: WebSockets closed first (1001)
        await server.app[PROXY].close_websockets()
        await server.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


async def open_ws(browser: Browser) -> Any:
    socket = await browser.client.ws_connect("/ws", headers=browser.headers())
    await socket.send_str("hello")
    assert (await socket.receive(timeout=5)).data == "echo hello"
    return socket


async def assert_open(socket: Any) -> None:
    await socket.send_str("still there?")
    assert (await socket.receive(timeout=5)).data == "echo still there?"


async def assert_closed(socket: Any, code: int, reason: str) -> None:
    message = await socket.receive(timeout=5)
    assert message.type in CLOSED, message
    assert (message.data, message.extra) == (code, reason)


# --- what ends a WebSocket ------------------------------------------------------------------


async def test_a_verification_past_verify_every_ends_the_websocket(
    site: SiteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployed = await site(security={"mfa_policy": "optional"})
    deployed.add_user("kate", "u-kate")
    kate = await deployed.browser("kate")
    await kate.enroll_totp()  # verified in this browser, now
    socket = await open_ws(kate)
    assert await deployed.review.review() == 0
    await assert_open(socket)
    # 12h and a minute later (mfa.verify_every: 12h), as the MFA gate's clock sees it.
    real = __import__("time")
    later = types.SimpleNamespace(time=lambda: real.time() + 12 * 3600 + 60)
    monkeypatch.setattr("sidecar.middleware.mfa_gate.time", later)
    assert await deployed.review.review() == 1
    await assert_closed(socket, 1008, "mfa_verification_required")
    await until(lambda: deployed.console_close_codes == [1001])  # going away: it did no wrong


async def test_a_policy_change_to_all_without_grace_ends_unprotected_websockets_at_once(
    site: SiteFactory,
) -> None:
    deployed = await site(security={"mfa_policy": "optional", "grace_period": "0s"})
    deployed.add_user("carol", "u-carol")
    deployed.add_user("dave", "u-dave")
    carol = await open_ws(await deployed.browser("carol"))  # no MFA: the policy allows it
    dave_browser = await deployed.browser("dave")
    await dave_browser.enroll_totp()
    dave = await open_ws(dave_browser)
    anonymous = await open_ws(await deployed.browser(None))
    # No review runs by the clock here (every 3600 s): the change itself wakes one.
    await deployed.change(mfa_policy="all", grace_period_seconds=0)
    await assert_closed(carol, 1008, "mfa_setup_required")
    await assert_open(dave)  # enrolled and verified
    await assert_open(anonymous)  # the console answers anonymous callers itself
    refused = await (await deployed.browser("carol")).get("/reports")
    assert (refused.status, (await refused.json())["error"]) == (403, "mfa_setup_required")


async def test_a_running_grace_period_keeps_websockets_open(site: SiteFactory) -> None:
    deployed = await site(security={"mfa_policy": "optional", "grace_period": "72h"})
    deployed.add_user("carol", "u-carol")
    carol = await open_ws(await deployed.browser("carol"))
    await deployed.change(mfa_policy="all")
    assert await deployed.review.review() == 0
    await assert_open(carol)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param({"ip_denylist": ("198.51.100.0/24",)}, "denied_ip", id="denylisted"),
        pytest.param(
            {"ip_allowlist": ("203.0.113.0/24",)}, "not_allowlisted", id="off the allowlist"
        ),
    ],
)
async def test_an_ip_list_change_ends_websockets_from_those_addresses_at_once(
    site: SiteFactory, change: dict[str, Any], reason: str
) -> None:
    deployed = await site()
    deployed.add_user("kate", "u-kate")
    kate = await open_ws(await deployed.browser("kate", "198.51.100.7"))
    anonymous = await open_ws(await deployed.browser(None, "198.51.100.8"))
    office = await open_ws(await deployed.browser("kate", "203.0.113.9"))
    await deployed.change(**change)
    await assert_closed(kate, 1008, reason)
    await assert_closed(anonymous, 1008, reason)  # anonymous or not: the IP gate is first
    await assert_open(office)
    await until(lambda: deployed.console_close_codes == [1001, 1001])


async def test_websockets_end_when_the_users_state_cannot_be_read(
    site: SiteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: a request would get 503 store_unavailable; the WebSocket 1013."""
    deployed = await site(security={"mfa_policy": "all", "grace_period": "72h"})
    deployed.add_user("kate", "u-kate")
    kate = await open_ws(await deployed.browser("kate"))
    anonymous = await open_ws(await deployed.browser(None))

    async def unreadable(user_id: str) -> MfaState:
        raise StoreUnavailable("database is down")

    monkeypatch.setattr(deployed.app[MFA], "state", unreadable)
    assert await deployed.review.review() == 1
    await assert_closed(kate, 1013, "store_unavailable")
    await assert_open(anonymous)  # judged by the IP gate alone, from memory


# --- what it costs --------------------------------------------------------------------------


async def test_one_review_reads_each_users_state_once(
    site: SiteFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployed = await site(security={"mfa_policy": "all", "grace_period": "72h"})
    deployed.add_user("kate", "u-kate")
    deployed.add_user("bob", "u-bob", role="admin")
    sockets = [await open_ws(await deployed.browser("kate")) for _ in range(3)]
    sockets += [await open_ws(await deployed.browser("bob")) for _ in range(2)]
    service: MfaService = deployed.app[MFA]
    asked: list[str] = []
    read: list[str] = []
    state, store_state = service.state, service.store.mfa.state

    async def counted_state(user_id: str) -> MfaState:
        asked.append(user_id)
        return await state(user_id)

    async def counted_store_state(user_id: str) -> MfaState:
        read.append(user_id)
        return await store_state(user_id)

    monkeypatch.setattr(service, "state", counted_state)
    monkeypatch.setattr(service.store.mfa, "state", counted_store_state)
    for user in ("u-kate", "u-bob"):
        service.forget(user)  # as if their cached state had just expired
    assert await deployed.review.review() == 0
    assert sorted(asked) == ["u-bob", "u-kate"]  # once per user, not per WebSocket
    assert sorted(read) == ["u-bob", "u-kate"]
    assert await deployed.review.review() == 0
    assert len(read) == 2  # the next review within the cache's life reads no store
    for socket in sockets:
        await assert_open(socket)
