"""Introspection inside the whole sidecar: the console answers "who is this?" for the same
request it will then serve, so what it decides there is what the MFA gate acts on."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.http_fields import UPSTREAM_MAX_FIELD
from tests.conftest import SidecarFactory

Client = TestClient[web.Request, web.Application]
Seen = web.AppKey("seen", list[tuple[str, dict[str, list[str]]]])
Bound = web.AppKey("bound", dict[str, str])
SetCookie = web.AppKey("set_cookie", list[str])

ALICE = {"Cookie": "console=u-alice"}
XHR = {"Accept": "application/json"}
MFA_FOR_EVERYONE = {"security": {"mfa_policy": "all", "grace_period": "0s"}}
CONTEXT = ("Host", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-For", "X-Api-Key")


def console_app() -> web.Application:
    """Knows alice by her cookie and dave by his API key, only in the context ``Bound``
    names (header: value); records the context of every request it receives."""
    app = web.Application()
    app[Seen] = []
    app[Bound] = {}
    app[SetCookie] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        context = {name: request.headers.getall(name, []) for name in CONTEXT}
        app[Seen].append((request.path, context))
        response: web.StreamResponse = await handler(request)
        return response

    def credential_of(request: web.Request) -> tuple[str, str] | None:
        """(user, kind of credential): alice's session cookie, that session's token sent as
        a bearer token, her API token; dave's API key."""
        for name, value in app[Bound].items():
            if request.headers.getall(name, []) != [value]:
                return None
        if request.cookies.get("console") == "u-alice":
            return "u-alice", "session"
        if request.headers.getall("X-Api-Key", []) == ["key-dave"]:
            return "u-dave", "api_key"
        authorization = request.headers.getall("Authorization", [])
        if authorization == ["Bearer u-alice"]:
            return "u-alice", "session"
        if authorization == ["Bearer api-alice"]:
            return "u-alice", "api_token"
        return None

    def user_of(request: web.Request) -> str | None:
        found = credential_of(request)
        return found[0] if found else None

    async def me(request: web.Request) -> web.Response:
        found = credential_of(request)
        if found is None:
            return web.json_response({"error": "unauthenticated"}, status=401)
        user, credential = found
        response = web.json_response(
            {
                "id": user,
                "email": None,
                "role": "member",
                "credential": credential,
                "auth": {"kind": credential, "api": credential == "api_token"},
            }
        )
        for line in app[SetCookie]:
            response.headers.add("Set-Cookie", line)
        return response

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.path} for {user_of(request) or 'anonymous'}")

    app.middlewares.append(record)
    app.router.add_get("/api/me", me)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


def pages_seen(console: web.Application) -> list[str]:
    return [path for path, _ in console[Seen] if path != "/api/me"]


async def test_a_host_scoped_console_is_never_answered_from_another_hosts_cache(
    sidecar_for: SidecarFactory,
) -> None:
    # The console knows alice on a.example only. Her cookie sent to b.example is anonymous
    # there, and served as such; on a.example she must set up MFA. Neither answer may be
    # reused for the other host, in either order, however often.
    console = console_app()
    console[Bound] = {"Host": "a.example", "X-Forwarded-Host": "a.example"}
    client = await sidecar_for(console, **MFA_FOR_EVERYONE)
    for _ in range(3):
        for host in ("b.example", "a.example"):
            response = await client.get("/reports", headers={**ALICE, **XHR, "Host": host})
            if host == "a.example":
                assert response.status == 403
                assert (await response.json())["error"] == "mfa_setup_required"
            else:
                assert response.status == 200
                assert await response.text() == "/reports for anonymous"
    assert pages_seen(console) == ["/reports"] * 3  # b.example's only
    # alice on a.example asked once, then cached; "anonymous" on b.example asked each time.
    assert [path for path, _ in console[Seen]].count("/api/me") == 1 + 3


async def test_an_address_bound_console_is_never_answered_from_another_address_cache(
    sidecar_for: SidecarFactory,
) -> None:
    # Behind a trusted balancer, the client address comes from X-Forwarded-For.
    console = console_app()
    console[Bound] = {"X-Forwarded-For": "192.0.2.1"}
    client = await sidecar_for(
        console, network={"trusted_proxies": ["127.0.0.0/8"]}, **MFA_FOR_EVERYONE
    )
    for _ in range(3):
        for address in ("192.0.2.1", "198.51.100.9"):
            response = await client.get(
                "/reports", headers={**ALICE, **XHR, "X-Forwarded-For": address}
            )
            expected = 403 if address == "192.0.2.1" else 200
            assert response.status == expected, address
    assert [path for path, _ in console[Seen]].count("/api/me") == 1 + 3


async def test_an_api_key_authenticated_user_meets_the_mfa_gate(
    sidecar_for: SidecarFactory,
) -> None:
    console = console_app()
    client = await sidecar_for(
        console, identity={"introspect": {"headers": ["X-Api-Key"]}}, **MFA_FOR_EVERYONE
    )
    response = await client.get("/reports", headers={"X-Api-Key": "key-dave", **XHR})
    assert response.status == 403
    assert (await response.json())["error"] == "mfa_setup_required"
    assert pages_seen(console) == []
    ((_, asked),) = console[Seen]
    assert asked["X-Api-Key"] == ["key-dave"]


async def test_the_api_key_reaches_the_console_as_it_was_judged(
    sidecar_for: SidecarFactory,
) -> None:
    console = console_app()
    client = await sidecar_for(console, identity={"introspect": {"headers": ["X-Api-Key"]}})
    response = await client.get("/reports", headers={"X-Api-Key": "key-dave"})
    assert await response.text() == "/reports for u-dave"


async def test_introspection_and_the_forwarded_request_carry_the_same_context(
    sidecar_for: SidecarFactory,
) -> None:
    console = console_app()
    client = await sidecar_for(console, network={"trusted_proxies": ["127.0.0.0/8"]})
    response = await client.get(
        "/reports",
        headers={
            **ALICE,
            "Host": "console.example:8443",
            "X-Forwarded-For": "6.6.6.6, 192.0.2.1",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
        },
    )
    assert await response.text() == "/reports for u-alice"
    (me_path, asked), (page_path, forwarded) = console[Seen]
    assert (me_path, page_path) == ("/api/me", "/reports")
    assert (
        asked
        == forwarded
        == {
            "Host": ["console.example:8443"],
            "X-Forwarded-Host": ["console.example:8443"],
            "X-Forwarded-Proto": ["https"],
            "X-Forwarded-For": ["192.0.2.1"],
            "X-Api-Key": [],
        }
    )


async def test_a_large_set_cookie_on_the_identity_answer_is_no_outage(
    sidecar_for: SidecarFactory,
) -> None:
    console = console_app()
    console[SetCookie] = ["big=" + "x" * 20_000, "other=1"]
    client = await sidecar_for(console)
    response = await client.get("/reports", headers=ALICE)
    assert response.status == 200
    assert await response.text() == "/reports for u-alice"


async def test_an_unreadable_identity_answer_is_503_and_its_bytes_are_never_logged(
    sidecar_for: SidecarFactory, caplog: pytest.LogCaptureFixture
) -> None:
    console = console_app()
    console[SetCookie] = ["SECRET-ANSWER-COOKIE=" + "x" * (UPSTREAM_MAX_FIELD + 1)]
    client = await sidecar_for(console)
    with caplog.at_level(logging.DEBUG):
        response = await client.get(
            "/reports", headers={"Cookie": "console=u-alice; other=SECRET-REQUEST-COOKIE"}
        )
    assert response.status == 503
    logged = "\n".join(
        f"{record.getMessage()} {getattr(record, 'fields', '')}"
        for record in caplog.records
        if record.name.startswith("sidecar")  # not the test servers' own logs
    )
    assert "identity" in logged
    assert "SECRET" not in logged
    assert "SECRET" not in await response.text()


async def test_two_host_lines_never_reach_the_console(sidecar_for: SidecarFactory) -> None:
    # The forwarding context takes the Host line as sent; a second, different one could make
    # the console and the sidecar read different hosts. aiohttp's server refuses it (400).
    console = console_app()
    console[Bound] = {"Host": "a.example"}
    client = await sidecar_for(console, **MFA_FOR_EVERYONE)
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /reports HTTP/1.1\r\nHost: b.example\r\nHost: a.example\r\n"
        b"Cookie: console=u-alice\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    assert console[Seen] == []


# --- API tokens: a bearer token is an API client only when the console says so ---------------

API_RULE = {"field": "credential", "value": "api_token"}
SESSION_AS_BEARER = {"Authorization": "Bearer u-alice"}
API_TOKEN = {"Authorization": "Bearer api-alice"}


async def test_the_browsers_session_token_as_a_bearer_token_meets_the_gate(
    sidecar_for: SidecarFactory,
) -> None:
    # The default configuration, with and without a rule: a phished password gives the
    # session token, never a way around the second factor.
    for identity in ({}, {"introspect": {"api_token": API_RULE}}):
        console = console_app()
        client = await sidecar_for(console, identity=identity, **MFA_FOR_EVERYONE)
        response = await client.get("/reports", headers={**SESSION_AS_BEARER, **XHR})
        assert response.status == 403
        assert (await response.json())["error"] == "mfa_setup_required"
        page = await client.get(
            "/reports",
            headers={**SESSION_AS_BEARER, "Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
            allow_redirects=False,
        )
        assert page.status == 303
        assert pages_seen(console) == []


async def test_an_api_token_the_console_marks_skips_the_gate(
    sidecar_for: SidecarFactory,
) -> None:
    console = console_app()
    client = await sidecar_for(
        console, identity={"introspect": {"api_token": API_RULE}}, **MFA_FOR_EVERYONE
    )
    response = await client.get("/reports", headers={**API_TOKEN, **XHR})
    assert await response.text() == "/reports for u-alice"


RULES: dict[str, tuple[dict[str, str] | None, dict[str, str], bool]] = {
    "the field": (API_RULE, API_TOKEN, True),
    "a nested path": ({"field": "auth.kind", "value": "api_token"}, API_TOKEN, True),
    "no rule": (None, API_TOKEN, False),
    "missing field": ({"field": "token_kind", "value": "api_token"}, API_TOKEN, False),
    "wrong value": ({"field": "credential", "value": "api"}, API_TOKEN, False),
    "non-string field": ({"field": "auth.api", "value": "true"}, API_TOKEN, False),
    "a nested path through a string": (
        {"field": "credential.kind", "value": "api_token"},
        API_TOKEN,
        False,
    ),
    "a console cookie next to the API token": (
        API_RULE,
        {**API_TOKEN, "Cookie": "console=u-alice"},
        False,
    ),
    "an API key next to the API token": (
        API_RULE,
        {**API_TOKEN, "X-Api-Key": "key-dave"},
        False,
    ),
}


@pytest.mark.parametrize(("rule", "sent", "passes"), RULES.values(), ids=RULES.keys())
async def test_only_marked_bearer_only_requests_skip_the_gate(
    sidecar_for: SidecarFactory, rule: dict[str, str] | None, sent: dict[str, str], passes: bool
) -> None:
    console = console_app()
    introspect: dict[str, Any] = {"headers": ["X-Api-Key"], "api_token": rule}
    client = await sidecar_for(console, identity={"introspect": introspect}, **MFA_FOR_EVERYONE)
    response = await client.get("/reports", headers={**sent, **XHR})
    if passes:
        assert response.status == 200
        assert pages_seen(console) == ["/reports"]
    else:
        assert response.status == 403
        assert (await response.json())["error"] == "mfa_setup_required"
        assert pages_seen(console) == []


async def test_enforce_on_tokens_false_lets_the_session_token_through_as_before(
    sidecar_for: SidecarFactory,
) -> None:
    # The old default, for consoles that cannot mark API tokens; check-config warns.
    console = console_app()
    client = await sidecar_for(console, mfa={"enforce_on_tokens": False}, **MFA_FOR_EVERYONE)
    response = await client.get("/reports", headers={**SESSION_AS_BEARER, **XHR})
    assert await response.text() == "/reports for u-alice"
