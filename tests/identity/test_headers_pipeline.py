"""The headers source inside the whole sidecar: does a verification outlive the user's
session at the auth proxy in front (oauth2-proxy)?"""

from __future__ import annotations

from typing import Any

import pyotp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import SidecarFactory

Client = TestClient[web.Request, web.Application]
PROXY_COOKIE = "_oauth2_proxy"
# What the auth proxy (the test client, from 127.0.0.1) adds to every request it passes on.
VOUCHED = {
    "X-Forwarded-For": "192.0.2.1",
    "X-Forwarded-User": "u-alice",
    "X-Forwarded-Email": "alice@example.com",
    "Accept": "application/json",
}


def console_app() -> web.Application:
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"console page {request.path}")

    app.router.add_route("*", "/{tail:.*}", page)
    return app


def proxy_login(client: Client, session: str) -> None:
    client.session.cookie_jar.update_cookies(
        {PROXY_COOKIE: session}, client.make_url("/").with_path("/")
    )


async def enroll_totp(client: Client) -> None:
    """Enroll an authenticator app: this also verifies the sidecar session."""
    status = await (await client.get("/mfa/api/status", headers=VOUCHED)).json()
    csrf = {**VOUCHED, "X-CSRF-Token": status["csrf_token"]}
    begun = await client.post("/mfa/api/totp/begin", headers=csrf)
    assert begun.status == 200, await begun.text()
    code = pyotp.TOTP((await begun.json())["secret"]).now()
    finished = await client.post("/mfa/api/totp/finish", json={"code": code}, headers=csrf)
    assert finished.status == 200, await finished.text()


async def verified_then_relogin(sidecar_for: SidecarFactory, **identity: Any) -> Client:
    client = await sidecar_for(
        console_app(),
        identity={"source": "headers", **identity},
        network={"trusted_proxies": ["127.0.0.0/8"]},
        security={"mfa_policy": "all", "grace_period": "0s"},
    )
    proxy_login(client, "session-1")
    refused = await client.get("/reports", headers=VOUCHED)
    assert (await refused.json())["error"] == "mfa_setup_required"
    await enroll_totp(client)
    assert (await client.get("/reports", headers=VOUCHED)).status == 200
    proxy_login(client, "session-2")  # logged out and in again at the auth proxy
    return client


async def test_with_the_session_cookie_a_proxy_relogin_needs_a_new_verification(
    sidecar_for: SidecarFactory,
) -> None:
    client = await verified_then_relogin(sidecar_for, headers={"session_cookie": PROXY_COOKIE})
    response = await client.get("/reports", headers=VOUCHED)
    assert response.status == 403
    assert (await response.json())["error"] == "mfa_verification_required"


async def test_without_the_session_cookie_a_verification_outlives_a_proxy_relogin(
    sidecar_for: SidecarFactory,
) -> None:
    # The documented default: bound to user, email and groups only, until mfa.verify_every.
    client = await verified_then_relogin(sidecar_for)
    response = await client.get("/reports", headers=VOUCHED)
    assert response.status == 200
    assert await response.text() == "console page /reports"


@pytest.mark.parametrize("path", ["/reports", "/mfa/api/status"])
async def test_a_vouched_request_without_the_proxy_cookie_is_503(
    sidecar_for: SidecarFactory, path: str
) -> None:
    client = await sidecar_for(
        console_app(),
        identity={"source": "headers", "headers": {"session_cookie": PROXY_COOKIE}},
        network={"trusted_proxies": ["127.0.0.0/8"]},
    )
    response = await client.get(path, headers=VOUCHED)
    assert response.status == 503
