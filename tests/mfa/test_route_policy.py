"""Every route the app registers declares its guards, and behaves as declared.

A route added without a declaration fails the first test; a declared guard that a handler
forgets (or checks after doing something) fails the attack that belongs to it: a call
without a console identity, without the CSRF token, as a member, as an admin who has not
verified recently, as a user who is locked out.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pyotp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.app import MFA, build_app
from sidecar.mfa.routes import ROUTE_GUARDS, Guard
from sidecar.mfa.service import user_lockout_key
from tests.conftest import make_config
from tests.mfa.attack import Browser, Client, Org, org_factory
from tests.mfa.softauthn import SoftAuthenticator

RP_ID, ORIGIN = "localhost", "http://localhost"


def test_every_registered_route_declares_its_guards(tmp_path: Path) -> None:
    app = build_app(make_config(tmp_path, "http://127.0.0.1:9"))
    declared = app[ROUTE_GUARDS]
    registered = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    assert registered == set(declared)
    # Under the prefix, everything that is not a static asset or a 404 needs an identity.
    for (method, path), guards in declared.items():
        if path.startswith("/mfa/api/") and "{tail" not in path:
            assert Guard.SIGNED_IN in guards, (method, path)
        if method in ("POST", "PUT", "DELETE", "PATCH"):
            assert Guard.SAME_SITE in guards, (method, path)
        if "/api/admin/" in path:
            assert {Guard.ADMIN, Guard.STEP_UP} <= guards, (method, path)


@pytest.fixture
async def org(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> AsyncIterator[Org]:
    async with AsyncExitStack() as stack:
        make = await org_factory(stack, "sqlite", tmp_path, aiohttp_server, aiohttp_client)
        org = await make()
        org.add_user("member", "u-member")
        org.add_user("admin", "u-admin", role="admin")
        org.add_user("newbie", "u-newbie")
        yield org


def declared_routes(org: Org) -> list[tuple[str, str, frozenset[Guard]]]:
    declared = org.servers[0].app[ROUTE_GUARDS]
    return sorted((m, p, g) for (m, p), g in declared.items() if g and m != "HEAD")


def concrete(path: str) -> str:
    return path.replace("{name}", "mfa.css").replace("{id}", "u-member")


BODIES: dict[str, Any] = {
    "/mfa/api/totp/finish": {"code": "123456"},
    "/mfa/api/verify/totp": {"code": "123456"},
    "/mfa/api/verify/recovery": {"code": "AAAAA-BBBBB"},
    "/mfa/api/verify/passkey/finish": {"credential": {}},
    "/mfa/api/passkey/finish": {"credential": {}, "name": "x"},
    "/mfa/api/admin/security": {"version": 1},
}


async def send(browser: Browser, method: str, path: str, *, csrf: bool) -> tuple[int, str]:
    body = BODIES.get(path)
    if csrf:
        response = await browser.call(concrete(path), body, method=method)
    else:
        response = await browser.client.request(
            method, concrete(path), json=body, headers=browser.headers(), allow_redirects=False
        )
    if response.content_type == "application/json":
        error = (await response.json()).get("error", "")
    else:
        error = response.headers.get("Location", "")
    return response.status, error


async def enrolled(org: Org, login: str) -> tuple[Browser, str]:
    """``login`` enrolled (TOTP and a passkey) in another browser; a fresh, unverified
    browser of theirs, and the TOTP secret."""
    first = await org.browser(login)
    secret, _ = await first.enroll_totp()
    token = (await first.status())["csrf_token"]
    begun = await first.call("/mfa/api/passkey/begin", csrf=token)
    assert begun.status == 200, await begun.text()
    finish = await first.call(
        "/mfa/api/passkey/finish",
        {"credential": SoftAuthenticator(RP_ID, ORIGIN).create(await begun.json()), "name": "k"},
    )
    assert finish.status == 200, await finish.text()
    return await org.browser(login), secret


async def test_signed_in_routes_refuse_anonymous_callers(org: Org) -> None:
    anonymous = await org.browser("nobody")
    for method, path, guards in declared_routes(org):
        if Guard.SIGNED_IN in guards:
            status, _ = await send(anonymous, method, path, csrf=False)
            assert status == 401, (method, path)


async def test_same_site_routes_refuse_calls_without_the_csrf_token(org: Org) -> None:
    admin, _ = await enrolled(org, "admin")
    for method, path, guards in declared_routes(org):
        if Guard.SAME_SITE in guards:
            assert await send(admin, method, path, csrf=False) == (403, "csrf"), (method, path)


async def test_admin_routes_refuse_members(org: Org) -> None:
    member = await org.browser("member")
    for method, path, guards in declared_routes(org):
        if Guard.ADMIN in guards:
            status, _ = await send(member, method, path, csrf=True)
            assert status == 403, (method, path)


async def test_step_up_routes_refuse_an_enrolled_browser_that_has_not_verified(org: Org) -> None:
    admin, _ = await enrolled(org, "admin")
    for method, path, guards in declared_routes(org):
        if Guard.STEP_UP in guards:
            status, error = await send(admin, method, path, csrf=True)
            if path.startswith("/mfa/api/"):
                assert (status, error) == (403, "step_up_required"), (method, path, status, error)
            else:  # a page: sent to verify first
                assert status == 303, (method, path)
                assert "/mfa/verify?next=" in error, (method, path)


async def test_counted_routes_refuse_a_locked_out_user(org: Org) -> None:
    kate, secret = await enrolled(org, "member")
    newbie = await org.browser("newbie")
    assert (await newbie.call("/mfa/api/totp/begin")).status == 200
    service = org.servers[0].app[MFA]
    for user in ("u-member", "u-newbie"):
        for _ in range(5):
            await service.store.lockout.reserve(
                {user_lockout_key(user): 5},
                now=service.now(),
                window_seconds=900,
                ban_seconds=900,
            )
    counted = [(m, p) for m, p, g in declared_routes(org) if Guard.COUNTED in g]
    assert len(counted) == 5
    for method, path in counted:
        browser = newbie if path == "/mfa/api/totp/finish" else kate
        status, error = await send(browser, method, path, csrf=True)
        assert (status, error) == (429, "locked_out"), (method, path, status, error)
    # The right code is not even looked at while locked.
    right = await kate.call(
        "/mfa/api/verify/totp", {"code": pyotp.TOTP(secret).at(time.time() + 30)}
    )
    assert right.status == 429


async def test_every_sidecar_answer_forbids_framing_and_foreign_scripts(org: Org) -> None:
    """Pages, API answers and refusals alike: a "Remove passkey" button in a frame of another
    site (clickjacking), an injected inline script or a leaking Referer are all refused by
    the browser."""
    member = await org.browser("member")
    anonymous = await org.browser("nobody")
    for method, path, _ in declared_routes(org):
        for browser in (member, anonymous):
            response = await browser.client.request(
                method, concrete(path), headers=browser.headers(), allow_redirects=False
            )
            csp = response.headers.get("Content-Security-Policy", "")
            assert "frame-ancestors 'none'" in csp, (method, path, response.status)
            assert "script-src 'self'" in csp, (method, path)
            assert response.headers.get("X-Frame-Options") == "DENY", (method, path)
            assert response.headers.get("Referrer-Policy") == "no-referrer", (method, path)
