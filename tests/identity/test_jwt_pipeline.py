"""The jwt source inside the whole sidecar, in front of a console stand-in that would accept
any token: who meets the MFA gate, and which tokens never reach the console."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import LIVE, METRICS, apply_config
from sidecar.config import Identity as IdentitySection
from tests.conftest import SidecarFactory
from tests.identity.tokens import RSA_KEY, claims, jwt_section, rs256

Client = TestClient[web.Request, web.Application]
Seen = web.AppKey("seen", list[str])

XHR = {"Accept": "application/json"}
HTML = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}
MFA_FOR_EVERYONE = {"security": {"mfa_policy": "all", "grace_period": "0s"}}
API_RULE = {"claim": "token_use", "value": "api"}


def console_app() -> web.Application:
    """Serves every request and records its path: a console lenient enough to accept any
    token the sidecar lets through, so what it receives is what the sidecar allowed."""
    app = web.Application()
    app[Seen] = []

    async def page(request: web.Request) -> web.Response:
        app[Seen].append(request.path)
        return web.Response(text=f"console page {request.path}")

    app.router.add_route("*", "/{tail:.*}", page)
    return app


async def jwt_sidecar(
    sidecar_for: SidecarFactory, console: web.Application, **sections: Any
) -> Client:
    jwt_settings = sections.pop("jwt", {})
    return await sidecar_for(
        console,
        identity={"source": "jwt", "jwt": jwt_section(**jwt_settings)},
        **MFA_FOR_EVERYONE,
        **sections,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"id_token={token}"}


def sample(client: Client, name: str, **labels: str) -> float | None:
    assert client.app is not None
    value: float | None = client.app[METRICS].registry.get_sample_value(name, labels)
    return value


def refusals(client: Client, reason: str) -> float | None:
    return sample(client, "sidecar_identity_token_refusals_total", reason=reason)


OURS_BUT_REFUSED: dict[str, tuple[Callable[[], str], str]] = {
    "without exp": (lambda: rs256(exp=None), "missing_claim"),
    "wrong audience": (lambda: rs256(aud="other-app"), "wrong_audience"),
    "wrong issuer": (lambda: rs256(iss="https://evil.example"), "wrong_issuer"),
    "algorithm not allowed": (
        lambda: jwt.encode(claims(), RSA_KEY, algorithm="PS256"),
        "algorithm_not_allowed",
    ),
    "not yet valid": (lambda: rs256(nbf=int(time.time()) + 600), "not_yet_valid"),
}


@pytest.mark.parametrize(
    ("token", "reason"), OURS_BUT_REFUSED.values(), ids=OURS_BUT_REFUSED.keys()
)
@pytest.mark.parametrize("where", ["bearer", "cookie"])
async def test_a_token_signed_with_our_key_but_refused_is_503_never_anonymous(
    sidecar_for: SidecarFactory, token: Callable[[], str], reason: str, where: str
) -> None:
    console = console_app()
    client = await jwt_sidecar(sidecar_for, console)
    assert refusals(client, reason) == 0
    sent = bearer(token()) if where == "bearer" else cookie(token())
    response = await client.get("/reports", headers={**sent, **XHR})
    assert response.status == 503
    assert (await response.json())["error"] == "identity_unavailable"
    assert console[Seen] == []
    assert refusals(client, reason) == 1
    assert sample(client, "sidecar_requests_total", decision="identity_unavailable") == 1


async def test_an_expired_token_is_anonymous_and_the_console_answers(
    sidecar_for: SidecarFactory,
) -> None:
    console = console_app()
    client = await jwt_sidecar(sidecar_for, console)
    expired = rs256(exp=int(time.time()) - 600)
    for sent in (bearer(expired), cookie(expired)):
        response = await client.get("/reports", headers={**sent, **XHR})
        assert await response.text() == "console page /reports"
    assert refusals(client, "expired") == 2


async def test_a_token_not_signed_with_our_key_is_anonymous(
    sidecar_for: SidecarFactory,
) -> None:
    console = console_app()
    client = await jwt_sidecar(sidecar_for, console)
    for token in ("not-a-jwt", rs256()[:-4] + "AAAA"):
        response = await client.get("/reports", headers={**bearer(token), **XHR})
        assert response.status == 200
    assert (refusals(client, "malformed"), refusals(client, "bad_signature")) == (1, 1)


async def test_the_browsers_session_token_as_a_bearer_token_meets_the_gate(
    sidecar_for: SidecarFactory,
) -> None:
    # The default configuration: a phished password gives the browser's token, never a way
    # around the second factor.
    console = console_app()
    client = await jwt_sidecar(sidecar_for, console, jwt={"api_token": API_RULE})
    session = rs256()
    api = await client.get("/api/reports", headers={**bearer(session), **XHR})
    assert api.status == 403
    assert (await api.json())["error"] == "mfa_setup_required"
    page = await client.get("/reports", headers={**bearer(session), **HTML}, allow_redirects=False)
    assert page.status == 303
    assert page.headers["Location"] == "/mfa/setup?next=/reports"
    assert console[Seen] == []


async def test_a_recognised_api_token_skips_the_gate(sidecar_for: SidecarFactory) -> None:
    console = console_app()
    client = await jwt_sidecar(sidecar_for, console, jwt={"api_token": API_RULE})
    response = await client.get("/api/reports", headers={**bearer(rs256(token_use="api")), **XHR})
    assert await response.text() == "console page /api/reports"


HELD: dict[str, Callable[[], dict[str, str]]] = {
    "the API claim in the cookie": lambda: cookie(rs256(token_use="api")),
    "a cookie token and an API token": lambda: {
        "Cookie": f"id_token={rs256()}",
        "Authorization": f"Bearer {rs256(token_use='api')}",
    },
    "an expired cookie token and an API token": lambda: {
        "Cookie": f"id_token={rs256(exp=int(time.time()) - 600)}",
        "Authorization": f"Bearer {rs256(token_use='api')}",
    },
    "the API claim with another value": lambda: bearer(rs256(token_use="id")),
}


@pytest.mark.parametrize("sent", HELD.values(), ids=HELD.keys())
async def test_browser_requests_meet_the_gate_whatever_their_tokens_claim(
    sidecar_for: SidecarFactory, sent: Callable[[], dict[str, str]]
) -> None:
    console = console_app()
    client = await jwt_sidecar(sidecar_for, console, jwt={"api_token": API_RULE})
    response = await client.get("/api/reports", headers={**sent(), **XHR})
    assert response.status == 403
    assert (await response.json())["error"] == "mfa_setup_required"
    assert console[Seen] == []


async def test_enforce_on_tokens_false_lets_every_bearer_token_skip_the_gate(
    sidecar_for: SidecarFactory,
) -> None:
    # The old default, kept for consoles that cannot mark API tokens (check-config warns).
    console = console_app()
    client = await jwt_sidecar(sidecar_for, console, mfa={"enforce_on_tokens": False})
    response = await client.get("/api/reports", headers={**bearer(rs256()), **XHR})
    assert response.status == 200
    held = await client.get("/api/reports", headers={**cookie(rs256()), **XHR})
    assert held.status == 403


async def test_a_reload_applies_the_api_token_rule_and_keeps_counting(
    sidecar_for: SidecarFactory,
) -> None:
    console = console_app()
    client = await jwt_sidecar(sidecar_for, console)
    app = client.app
    assert app is not None
    api = {**bearer(rs256(token_use="api")), **XHR}
    refused = {**bearer(rs256(aud="other-app")), **XHR}
    assert (await client.get("/reports", headers=api)).status == 403
    assert (await client.get("/reports", headers=refused)).status == 503
    identity = IdentitySection.model_validate(
        {"source": "jwt", "jwt": jwt_section(api_token=API_RULE)}
    )
    await apply_config(app, app[LIVE].config.model_copy(update={"identity": identity}))
    assert (await client.get("/reports", headers=api)).status == 200
    assert (await client.get("/reports", headers=refused)).status == 503
    assert refusals(client, "wrong_audience") == 2
