"""The MFA gate end to end: a stub console, the whole sidecar app, a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from sidecar.app import MFA, STORE
from sidecar.store.base import StoreUnavailable
from tests.mfa.support import (
    HTML,
    XHR,
    Client,
    Cookies,
    Down,
    csrf,
    enroll_totp,
    hits,
    login,
    next_code,
)

ALL_72H = {"security": {"mfa_policy": "all", "grace_period": "72h"}}
ALL_NO_GRACE = {"security": {"mfa_policy": "all", "grace_period": "0s"}}


async def test_member_inside_grace_passes_after_one_interstitial(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer
) -> None:
    client = await sidecar(**ALL_72H)
    login(client, "carol")
    first = await client.get("/settings", headers=HTML)
    assert first.status == 200
    text = await first.text()
    assert "Set up now" in text
    assert hits(console) == []
    second = await client.get("/settings", headers=HTML)
    assert await second.text() == "console page /settings"
    assert (await client.get("/api/data", headers=XHR)).status == 200


async def test_after_grace_navigation_is_redirected_and_xhr_gets_json(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "carol")
    page = await client.get("/reports?page=2", headers=HTML, allow_redirects=False)
    assert page.status == 303
    assert page.headers["Location"] == "/mfa/setup?next=/reports%3Fpage%3D2"
    api = await client.get("/api/data", headers=XHR)
    assert api.status == 403
    assert await api.json() == {
        "error": "mfa_setup_required",
        "message": "Set up multi-factor authentication to continue.",
        "location": "/mfa/setup",
    }
    assert hits(console) == []


async def test_policy_admins_spares_members_but_not_admins(
    sidecar: Callable[..., Awaitable[Client]],
) -> None:
    client = await sidecar(security={"mfa_policy": "admins", "grace_period": "0s"})
    login(client, "carol")
    assert (await client.get("/", headers=XHR)).status == 200
    login(client, "bob")
    assert (await client.get("/", headers=XHR)).status == 403


@pytest.mark.parametrize(
    ("path", "passes"),
    [
        ("/static/app.css", True),
        ("/logout", True),
        ("/logout/all", True),
        ("/logoutx", False),
        ("/static/../settings", False),
        ("/static/%2e%2e/settings", False),
        ("/static/%2E%2E/settings", False),
        ("/static%2f..%2fsettings", False),
        ("/static/..%2fsettings", False),
        ("/static/..%2Fsettings", False),
        ("/static/%2e%2e%2Fsettings", False),
        ("/static/..;/settings", False),
        ("/static\\..\\settings", False),
    ],
)
async def test_exempt_paths_pass_and_path_tricks_do_not(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer, path: str, passes: bool
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "carol")
    response = await client.get(URL(path, encoded=True), headers=XHR)
    if passes:
        assert response.status == 200
        assert hits(console) == [path]
    else:
        # Refused by the gate (after any redirect to the canonical path): the console never
        # saw the request at all.
        assert response.status == 403, (response.url, hits(console))
        assert hits(console) == []


@pytest.mark.parametrize(
    "target", [b"/static//..//settings", b"/static/./../settings", b"/x/%2e%2E/settings"]
)
async def test_non_canonical_paths_are_redirected_to_what_the_gate_judges(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer, target: bytes
) -> None:
    # Sent raw: client libraries would normalise these before sending.
    client = await sidecar(**ALL_NO_GRACE)
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nCookie: console=carol\r\n"
        b"Connection: close\r\n\r\n"
    )
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 308")
    assert b"\r\nLocation: /settings\r\n" in answer
    assert hits(console) == []


async def test_anonymous_requests_reach_the_console_without_a_decision(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    response = await client.get("/login", headers=HTML)
    assert await response.text() == "console page /login"


async def test_bearer_tokens_meet_the_gate_unless_tokens_are_exempted(
    sidecar: Callable[..., Awaitable[Client]],
) -> None:
    # A bearer token alone is no API client (it may be a browser's session token); which
    # tokens are API tokens is the identity source's rule (tests/identity).
    client = await sidecar(**ALL_NO_GRACE)
    token = {"Authorization": "Bearer token-carol"}
    assert (await client.get("/api/data", headers=token)).status == 403
    lenient = await sidecar(**ALL_NO_GRACE, mfa={"enforce_on_tokens": False})
    assert (await lenient.get("/api/data", headers=token)).status == 200


async def test_totp_enrollment_then_a_new_session_must_verify(
    sidecar: Callable[..., Awaitable[Client]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    console: TestServer,
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "carol")
    secret, codes = await enroll_totp(client)
    assert len(codes) == 10
    assert len(set(codes)) == 10
    assert (await client.get("/settings", headers=HTML)).status == 200
    assert hits(console) == ["/settings"]

    # The same console login in another browser: no sidecar session, must verify.
    other = await aiohttp_client(client.server)
    login(other, "carol")
    page = await other.get("/settings", headers=HTML, allow_redirects=False)
    assert page.status == 303
    assert page.headers["Location"] == "/mfa/verify?next=/settings"
    token = await csrf(other)
    verified = await other.post(
        "/mfa/api/verify/totp", json={"code": next_code(secret)}, headers={"X-CSRF-Token": token}
    )
    assert verified.status == 200, await verified.text()
    assert (await other.get("/settings", headers=HTML)).status == 200

    # Replaying the same code from yet another browser is refused.
    third = await aiohttp_client(client.server)
    login(third, "carol")
    replay = await third.post(
        "/mfa/api/verify/totp",
        json={"code": next_code(secret)},
        headers={"X-CSRF-Token": await csrf(third)},
    )
    assert replay.status == 400


async def test_recovery_code_works_once(
    sidecar: Callable[..., Awaitable[Client]], aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "carol")
    _, codes = await enroll_totp(client)
    fresh = await aiohttp_client(client.server)
    login(fresh, "carol")
    token = await csrf(fresh)
    typed = codes[0].lower().replace("-", " ")
    first = await fresh.post(
        "/mfa/api/verify/recovery", json={"code": typed}, headers={"X-CSRF-Token": token}
    )
    assert first.status == 200
    assert (await first.json())["recovery_codes_left"] == 9
    again = await aiohttp_client(client.server)
    login(again, "carol")
    second = await again.post(
        "/mfa/api/verify/recovery",
        json={"code": codes[0]},
        headers={"X-CSRF-Token": await csrf(again)},
    )
    assert second.status == 400


async def test_lockout_after_n_failures_even_for_a_correct_code(
    sidecar: Callable[..., Awaitable[Client]], aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client = await sidecar(**ALL_NO_GRACE, mfa={"lockout": {"max_failures": 3}})
    login(client, "carol")
    secret, _ = await enroll_totp(client)
    attacker = await aiohttp_client(client.server)
    login(attacker, "carol")
    token = await csrf(attacker)
    statuses = []
    for _ in range(3):
        wrong = await attacker.post(
            "/mfa/api/verify/totp", json={"code": "000000"}, headers={"X-CSRF-Token": token}
        )
        statuses.append(wrong.status)
    assert statuses == [400, 400, 429]
    correct = await attacker.post(
        "/mfa/api/verify/totp", json={"code": next_code(secret)}, headers={"X-CSRF-Token": token}
    )
    assert correct.status == 429
    body = await correct.json()
    assert body["error"] == "locked_out"
    assert body["locked_until"]


async def test_a_session_verified_for_one_user_does_not_pass_another(
    sidecar: Callable[..., Awaitable[Client]], aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "bob")
    await enroll_totp(client)
    other = await aiohttp_client(client.server)
    login(other, "carol")
    await enroll_totp(other)
    # Carol's browser now carries Bob's verified sidecar cookie, with Carol's console login.
    bob_cookie = client.session.cookie_jar.filter_cookies(client.make_url("/"))["sidecar_session"]
    other.session.cookie_jar.update_cookies(
        {"sidecar_session": bob_cookie.value}, URL(str(other.make_url("/")))
    )
    third = await aiohttp_client(client.server)
    login(third, "carol")
    third.session.cookie_jar.update_cookies(
        {"sidecar_session": bob_cookie.value}, URL(str(third.make_url("/")))
    )
    response = await third.get("/", headers=XHR)
    assert response.status == 403
    assert (await response.json())["error"] == "mfa_verification_required"


async def test_sidecar_cookie_flags(
    sidecar: Callable[..., Awaitable[Client]],
) -> None:
    client = await sidecar(
        **ALL_NO_GRACE,
        mfa={"session": {"secure": True}},
    )
    login(client, "carol")
    response = await client.get("/mfa/api/status")
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("sidecar_session=")
    for flag in ("HttpOnly", "SameSite=Lax", "Secure", "Path=/"):
        assert flag in cookie


async def test_sidecar_cookie_is_not_forwarded_to_the_console(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer
) -> None:
    client = await sidecar(**ALL_72H)
    login(client, "carol")
    await client.get("/mfa/api/status")
    assert "sidecar_session" in {c.key for c in client.session.cookie_jar}
    response = await client.get("/whoami", headers=XHR)
    assert response.status == 200
    assert console.app[Cookies] == ["console=carol"]


async def test_state_changing_calls_need_the_csrf_token_and_same_site(
    sidecar: Callable[..., Awaitable[Client]],
) -> None:
    client = await sidecar(**ALL_72H)
    login(client, "carol")
    token = await csrf(client)
    missing = await client.post("/mfa/api/totp/begin")
    assert missing.status == 403
    wrong = await client.post("/mfa/api/totp/begin", headers={"X-CSRF-Token": "x" + token})
    assert wrong.status == 403
    cross = await client.post(
        "/mfa/api/totp/begin",
        headers={"X-CSRF-Token": token, "Origin": "https://evil.example"},
    )
    assert cross.status == 403
    cross_fetch = await client.post(
        "/mfa/api/totp/begin", headers={"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"}
    )
    assert cross_fetch.status == 403
    ok = await client.post(
        "/mfa/api/totp/begin", headers={"X-CSRF-Token": token, "Origin": "http://localhost"}
    )
    assert ok.status == 200


async def test_sidecar_routes_are_never_forwarded(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer
) -> None:
    client = await sidecar(**ALL_72H)
    login(client, "carol")
    assert (await client.get("/mfa/nope")).status == 404
    assert (await client.get("/mfa")).status == 404
    assert hits(console) == []


async def test_console_down_gives_503_but_the_ip_gate_still_works(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer
) -> None:
    client = await sidecar(**ALL_72H)
    blocked = await sidecar(
        security={"managed_by": "config", "mfa_policy": "all", "ip_denylist": ["127.0.0.1"]}
    )
    login(client, "carol")
    login(blocked, "carol")
    console.app[Down][0] = True
    down = await client.get("/settings", headers=XHR)
    assert down.status == 503
    assert (await down.json())["error"] == "identity_unavailable"
    assert (await blocked.get("/settings", headers=XHR)).status == 403
    console.app[Down][0] = False
    assert (await client.get("/settings", headers=XHR)).status == 200


async def test_store_unreachable_gives_503_and_recovers(
    sidecar: Callable[..., Awaitable[Client]], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "carol")
    store = client.app[STORE]
    service = client.app[MFA]

    async def broken(*args: object, **kwargs: object) -> Any:
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(store.mfa, "state", broken)
    service.forget("u-carol")
    response = await client.get("/", headers=XHR)
    assert response.status == 503
    assert (await response.json())["error"] == "store_unavailable"
    monkeypatch.undo()
    assert (await client.get("/", headers=XHR)).status == 403  # decided again: setup required


async def test_an_encoded_slash_after_the_prefix_is_never_forwarded(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "carol")
    for target in ("/mfa%2F..%2Fsettings", "/mfa%2Fapi/status", "/mfa%2f"):
        response = await client.get(URL(target, encoded=True), headers=HTML)
        assert response.status in (303, 404), target
    assert hits(console) == []


@pytest.mark.parametrize(
    "cookie",
    [
        "sidecar_session =a console=carol",
        "theme=dark console=carol",
        "theme=x,console=carol",
        "theme=x\tconsole=carol",
    ],
)
async def test_the_console_never_reads_a_cookie_the_sidecar_did_not_judge(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer, cookie: str
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    response = await client.get("/settings", headers={"Cookie": cookie, **XHR})
    # Judged anonymous (no well-formed console cookie), so forwarded without a decision:
    # then the console must not see carol's cookie either.
    assert response.status == 200
    assert console.app[Cookies] == [None]


async def test_connection_cannot_strip_the_credentials_the_sidecar_judged(
    sidecar: Callable[..., Awaitable[Client]], console: TestServer
) -> None:
    client = await sidecar(**ALL_72H)
    login(client, "carol")
    await client.get("/settings", headers={**XHR, "Connection": "Cookie, Host, Authorization"})
    assert console.app[Cookies] == ["console=carol"]


async def test_an_unrelated_cookie_does_not_end_a_verification_when_cookies_are_named(
    sidecar: Callable[..., Awaitable[Client]],
) -> None:
    client = await sidecar(**ALL_NO_GRACE, identity={"introspect": {"cookies": ["console"]}})
    login(client, "carol")
    await enroll_totp(client)
    assert (await client.get("/settings", headers=XHR)).status == 200
    client.session.cookie_jar.update_cookies({"theme": "dark"}, URL(str(client.make_url("/"))))
    assert (await client.get("/settings", headers=XHR)).status == 200
