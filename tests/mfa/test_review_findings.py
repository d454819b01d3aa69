"""Review findings (attack-review): each test demonstrates a way through the trust boundary
that worked until it was fixed; each test now attacks the fix."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from yarl import URL

from sidecar.app import MFA, SETTINGS, build_app
from sidecar.mfa.service import Actor
from tests.conftest import deep_merge, make_config
from tests.mfa.attack import Browser, Client, Org, OrgFactory, org_factory
from tests.store.support import StoreKind

JSON = {"Accept": "application/json"}


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
async def make_org(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> AsyncIterator[OrgFactory]:
    kind: StoreKind = request.param
    async with AsyncExitStack() as stack:
        yield await org_factory(stack, kind, tmp_path, aiohttp_server, aiohttp_client)


def advance(org: Org, hours: float) -> None:
    """Move every replica's MFA clock forward."""
    for server in org.servers:
        service = server.app[MFA]
        clock: Callable[[], datetime] = service._clock

        def later(clock: Callable[[], datetime] = clock) -> datetime:
            return clock() + timedelta(hours=hours)

        service._clock = later


async def set_policy(org: Org, policy: str) -> None:
    settings = org.servers[0].app[SETTINGS]
    current = settings.current
    assert current is not None
    saved = await settings.change(
        mfa_policy=policy,
        grace_period_seconds=current.grace_period_seconds,
        ip_allowlist=current.ip_allowlist,
        ip_denylist=current.ip_denylist,
        actor="u-root",
        expected_version=current.version,
    )
    assert saved is not None


async def test_a_role_change_after_admins_to_all_never_restarts_an_overdue_grace_clock(
    make_org: OrgFactory,
) -> None:
    org = await make_org(
        security={"mfa_policy": "admins", "grace_period": "72h"},
        identity={"introspect": {"cache_ttl": "0s"}},  # role changes seen at once
        replicas=2,
    )
    org.add_user("alice", "u-alice", role="admin")
    alice = await org.browser("alice")
    assert (await alice.get("/settings", headers=JSON)).status == 200  # grace starts
    advance(org, 73)
    overdue = await alice.get("/settings", headers=JSON)
    assert overdue.status == 403
    assert (await overdue.json())["error"] == "mfa_setup_required"
    # MFA is rolled out to everyone: alice stays required, still overdue.
    await set_policy(org, "all")
    assert (await alice.get("/settings", headers=JSON)).status == 403
    # Her role flaps (e.g. through an API token, which skips the gate): she was required
    # all along, yet her grace clock starts anew.
    org.users["alice"]["role"] = "member"
    flapped = await alice.get("/settings", headers=JSON)
    # And the restart sticks when she is an admin again (seen from a replica whose cache
    # never held her old clock, or after a restart): 72 more hours without MFA.
    org.users["alice"]["role"] = "admin"
    await org.servers[1].app[SETTINGS].refresh()
    elsewhere = await org.browser("alice", replica=1)
    back = await elsewhere.get("/settings", headers=JSON)
    assert (flapped.status, back.status) == (403, 403)


async def test_an_anonymous_answer_cached_before_login_skips_the_gate_after_it(
    make_org: OrgFactory,
) -> None:
    """A console that keeps its session id across login (the session is upgraded in place:
    PHP without session_regenerate_id, express-session without regenerate(), many
    home-grown consoles) is read as anonymous for cache_ttl after the login."""
    org = await make_org(security={"mfa_policy": "all", "grace_period": "0s"})
    org.add_user("kate", "u-kate")
    kate = await org.browser("kate")
    await kate.enroll_totp()  # kate protects her account with an authenticator app
    # The attacker knows kate's password, not her second factor. Their browser holds a
    # not-yet-authenticated console session "sess-42" while on the login page...
    attacker = await org.browser("sess-42", address="192.0.2.66")
    assert (await attacker.get("/login", headers=JSON)).status == 200
    # ...and logs in with the password: the console marks sess-42 as kate's session.
    org.users["sess-42"] = org.users["kate"]
    # Right after the login the sidecar must ask for kate's second factor.
    settings = await attacker.get("/settings", headers=JSON)
    assert settings.status == 403, await settings.text()
    assert (await settings.json())["error"] == "mfa_verification_required"


# --- a console with a WebSocket and a "remember me" cookie ---------------------------------


@dataclass
class Deployment:
    app: web.Application
    client: Client
    users: dict[str, dict[str, Any]]


def rich_console(users: dict[str, dict[str, Any]]) -> web.Application:
    """A console that knows a user by its session cookie ``console`` or, when that is
    missing (expired), by its long-lived ``remember`` cookie (Rails, Laravel, Django
    allauth... all do this); it has a WebSocket echo (a live terminal, say)."""
    app = web.Application()

    def user_of(request: web.Request) -> dict[str, Any] | None:
        return users.get(request.cookies.get("console", "")) or users.get(
            request.cookies.get("remember", "")
        )

    async def me(request: web.Request) -> web.Response:
        user = user_of(request)
        if user is None:
            return web.json_response({"error": "unauthenticated"}, status=401)
        return web.json_response(user)

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for msg in socket:
            if msg.type is WSMsgType.TEXT:
                await socket.send_str(f"echo {msg.data}")
        return socket

    async def page(request: web.Request) -> web.Response:
        user = user_of(request)
        if user is None:
            return web.Response(status=401, text="log in")
        return web.Response(text=f"{request.path} for {user['id']}")

    app.router.add_get("/api/me", me)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


@pytest.fixture
async def deploy(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> Callable[..., Awaitable[Deployment]]:
    async def factory(**sections: Any) -> Deployment:
        users: dict[str, dict[str, Any]] = {
            "kate-session": {"id": "u-kate", "email": "kate@example.com", "role": "member"}
        }
        console = await aiohttp_server(rich_console(users))
        config = make_config(
            tmp_path,
            f"http://127.0.0.1:{console.port}",
            **deep_merge({"network": {"trusted_proxies": ["127.0.0.1/32"]}}, sections),
        )
        app = build_app(config)
        return Deployment(app, await aiohttp_client(app), users)

    return factory


def kates_browser(deployment: Deployment, cookies: dict[str, str]) -> Browser:
    client = deployment.client
    client.session.cookie_jar.update_cookies(cookies, URL(str(client.make_url("/"))))
    return Browser(client, "198.51.100.7")


async def test_an_open_websocket_outlives_the_denylist_and_an_mfa_reset(
    deploy: Callable[..., Awaitable[Deployment]],
) -> None:
    deployment = await deploy(security={"mfa_policy": "all", "grace_period": "0s"})
    kate = kates_browser(deployment, {"console": "kate-session"})
    await kate.enroll_totp()  # verified in this browser
    socket = await deployment.client.ws_connect("/ws", headers=kate.headers())
    await socket.send_str("hello")
    assert (await socket.receive(timeout=5)).data == "echo hello"
    # Incident response: kate's session is thought stolen. An admin denylists the address
    # it comes from and resets kate's MFA (which "ends verified sessions").
    settings = deployment.app[SETTINGS]
    current = settings.current
    assert current is not None
    await settings.change(
        mfa_policy=current.mfa_policy,
        grace_period_seconds=current.grace_period_seconds,
        ip_allowlist=(),
        ip_denylist=("198.51.100.7/32",),
        actor="u-admin",
        expected_version=current.version,
    )
    await deployment.app[MFA].reset("u-kate", Actor("u-admin", None))
    assert (await kate.get("/reports")).status == 403  # new requests are refused...
    # ...but the terminal already open keeps working, for as long as it stays open.
    await asyncio.sleep(6)  # longer than any cache (MFA state: 5 s)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await socket.send_str("rm -rf /")
    answer = await socket.receive(timeout=5)
    assert answer.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED), answer
    await socket.close()


async def test_a_console_cookie_left_out_of_introspect_cookies_still_reaches_the_console(
    deploy: Callable[..., Awaitable[Deployment]],
) -> None:
    """README: name the console's session cookies in identity.introspect.cookies. Only
    those are judged, but every cookie is forwarded; the console's remember-me cookie logs
    the user in without passing the gate."""
    deployment = await deploy(
        security={"mfa_policy": "all", "grace_period": "0s"},
        identity={"introspect": {"cookies": ["console"]}},
    )
    deployment.users["kate-remember"] = deployment.users["kate-session"]
    kate = kates_browser(deployment, {"console": "kate-session"})
    await kate.enroll_totp()
    # The attacker has kate's password (so a remember-me cookie: "keep me signed in"), not
    # her second factor, and a browser of their own (none of kate's cookies).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as own_browser:
        attacker = await own_browser.get(
            deployment.client.make_url("/settings"),
            headers={"Cookie": "remember=kate-remember", "X-Forwarded-For": "192.0.2.66", **JSON},
            allow_redirects=False,
        )
        body = await attacker.text()
    assert attacker.status == 403, body  # mfa_verification_required: the gate judged it


# --- refused admin actions leave an incomplete trail ------------------------------------------


async def test_a_refused_reset_names_the_user_it_was_aimed_at(make_org: OrgFactory) -> None:
    org = await make_org()
    org.add_user("bob", "u-bob", role="admin")
    org.add_user("carol", "u-carol")
    await (await org.browser("bob")).enroll_totp()
    # bob's console session is stolen; the thief has not got his second factor, and tries
    # to reset carol's MFA (to enroll their own authenticator on her account next).
    thief = await org.browser("bob", address="192.0.2.66")
    refused = await thief.call("/mfa/api/admin/users/u-carol/reset-mfa")
    assert refused.status == 403
    records = org.audit("admin.refused")
    assert len(records) == 1
    assert "u-carol" in json.dumps(records[0]), records[0]  # today: only the route pattern


async def test_every_refused_admin_call_reaches_the_audit_trail(make_org: OrgFactory) -> None:
    org = await make_org()
    org.add_user("carol", "u-carol")
    carol = await org.browser("carol", address="192.0.2.66")
    for _ in range(30):  # a member probing the admin API in a burst, then stopping
        assert (await carol.get("/mfa/api/admin/security")).status == 403
    # The first at once; the other 29 by the flush (here: at shutdown), in one record.
    assert [r["details"]["count"] for r in org.audit("admin.refused")] == [1]
    await org.servers[0].close()
    records = org.audit("admin.refused")
    assert sum(r["details"]["count"] for r in records) == 30, records
    assert len(records) == 2
