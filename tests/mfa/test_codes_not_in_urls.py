"""Codes never travel in URLs.

A form the browser submits by itself (no script) is a GET to the page's own address: the
TOTP or recovery code would land in the address bar, the history, server logs and the next
page's ``Referer``. So every form on the sidecar's pages posts and is disabled until the
page's script enables it (the script sends the values as JSON), the one exception being the
audit log's filters (no secret, no change, meant to be bookmarkable). And the API never
takes a code from the query string, whoever builds the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import pyotp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.mfa.pages import PageContext, render_setup, render_verify
from sidecar.mfa.security_pages import render_audit, render_security
from tests.mfa.support import HTML, Client, csrf, enroll_totp, hits, login, next_code

CTX = PageContext(
    prefix="/mfa",
    csrf_token="csrf-token-123",
    user="alice@example.com",
    role="admin",
    next_path="/reports",
    app_name="Console",
)
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SETTINGS: dict[str, Any] = {
    "mfa_policy": "admins",
    "grace_period_seconds": 259200,
    "ip_allowlist": ["203.0.113.0/24"],
    "ip_denylist": [],
    "managed_by": "store",
    "version": 3,
}
METHODS: dict[str, Any] = {"totp": True, "passkeys": [], "recovery_codes_left": 10}

PAGES: dict[str, Callable[[], str]] = {
    "setup": lambda: render_setup(
        CTX, required=True, grace_deadline=None, enrolled=False, has_totp=False, now=NOW
    ),
    "setup-enrolled": lambda: render_setup(
        CTX, required=False, grace_deadline=None, enrolled=True, has_totp=True, now=NOW
    ),
    "verify": lambda: render_verify(
        CTX, has_totp=True, has_passkeys=True, locked_until=None, now=NOW
    ),
    "verify-locked": lambda: render_verify(
        CTX, has_totp=True, has_passkeys=True, locked_until=NOW + timedelta(minutes=5), now=NOW
    ),
    "security": lambda: render_security(
        CTX,
        privileged=True,
        methods=METHODS,
        settings=SETTINGS,
        preview=None,
        session_lifetime="Set by Console",
        verify_every="12 hours",
        lockout="5 failed attempts",
    ),
    "audit": lambda: render_audit(CTX),
}
GET_FORMS = {"audit-filters"}  # no secret, no change: a bookmarkable search
CONTROLS = {"input", "textarea", "select", "button"}
VOID = {"input", "br", "img", "meta", "link", "hr", "col", "area", "base", "wbr", "source"}


class Forms(HTMLParser):
    """Each form's method, and each control with its form and whether a
    ``<fieldset disabled data-needs-script>`` around it holds it until the script runs."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.methods: dict[str, str | None] = {}
        self.controls: list[tuple[str | None, str, bool]] = []  # (form id, control, held)
        self._open: list[tuple[str, dict[str, str | None]]] = []
        self.noscript = ""
        self._in_noscript = False
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.methods[str(attributes.get("id"))] = attributes.get("method")
        if tag in CONTROLS:
            form = next((a.get("id") for t, a in reversed(self._open) if t == "form"), None)
            held = any(
                t == "fieldset" and "disabled" in a and "data-needs-script" in a
                for t, a in self._open
            ) or ("disabled" in attributes and "data-needs-script" in attributes)
            self.controls.append((form, str(attributes.get("id") or attributes.get("name")), held))
        if tag == "noscript":
            self._in_noscript = True
        if tag not in VOID:
            self._open.append((tag, attributes))

    def handle_endtag(self, tag: str) -> None:
        if tag == "noscript":
            self._in_noscript = False
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._in_noscript:
            self.noscript += data


@pytest.mark.parametrize("name", sorted(PAGES))
def test_forms_post_and_wait_for_the_script(name: str) -> None:
    forms = Forms(PAGES[name]())

    assert forms.methods, "no forms found"
    for form_id, method in forms.methods.items():
        assert method == ("get" if form_id in GET_FORMS else "post"), form_id
    held = {(form, control) for form, control, is_held in forms.controls if is_held}
    for form, control, _ in forms.controls:
        if form is not None and form not in GET_FORMS:
            assert (form, control) in held, f"{control} in {form} works without the script"
    # And the page says why its forms do nothing without JavaScript.
    assert "needs JavaScript" in " ".join(forms.noscript.split())


@pytest.mark.parametrize("name", ["verify", "verify-locked"])
def test_the_passkey_button_also_waits_for_the_script(name: str) -> None:
    forms = Forms(PAGES[name]())
    assert ("passkey-verify-button", True) in {(c, h) for f, c, h in forms.controls if f is None}


# --- the API never reads a code from the query string ---------------------------------------

ALL_NO_GRACE = {"security": {"mfa_policy": "all", "grace_period": "0s"}}


async def _status(client: Client) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/mfa/api/status")).json()
    return body


async def _second_browser(
    sidecar: Callable[..., Awaitable[Client]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> tuple[Client, str, list[str]]:
    """Carol enrolled with an authenticator app in one browser; another, unverified one."""
    first = await sidecar(**ALL_NO_GRACE)
    login(first, "carol")
    secret, codes = await enroll_totp(first)
    other = await aiohttp_client(first.server)
    login(other, "carol")
    return other, secret, codes


async def test_verify_page_ignores_a_code_in_its_address(
    sidecar: Callable[..., Awaitable[Client]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    console: TestServer,
) -> None:
    client, secret, codes = await _second_browser(sidecar, aiohttp_client)
    for code in (next_code(secret), codes[0]):
        page = await client.get("/mfa/verify", params={"code": code, "next": "/settings"})
        assert page.status == 200  # just the page
        assert not (await _status(client))["verified"]
    blocked = await client.get("/settings", headers=HTML, allow_redirects=False)
    assert blocked.status == 303
    assert blocked.headers["Location"].startswith("/mfa/verify")
    assert hits(console) == []


@pytest.mark.parametrize("body", [None, {}], ids=["no body", "empty JSON"])
@pytest.mark.parametrize("method", ["totp", "recovery"])
async def test_verify_api_ignores_a_code_in_the_query(
    sidecar: Callable[..., Awaitable[Client]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    method: str,
    body: dict[str, Any] | None,
) -> None:
    client, secret, codes = await _second_browser(sidecar, aiohttp_client)
    code = next_code(secret) if method == "totp" else codes[0]
    token = await csrf(client)
    path = f"/mfa/api/verify/{method}"

    refused = await client.post(
        path, params={"code": code}, json=body, headers={"X-CSRF-Token": token}
    )
    assert refused.status == 400
    assert (await refused.json())["error"] == "bad_request"
    assert not (await _status(client))["verified"]
    # The code was neither used up nor counted as a failure: in the body it works.
    accepted = await client.post(path, json={"code": code}, headers={"X-CSRF-Token": token})
    assert accepted.status == 200, await accepted.text()
    assert (await _status(client))["verified"]


async def test_enrollment_ignores_a_code_in_the_query(
    sidecar: Callable[..., Awaitable[Client]],
) -> None:
    client = await sidecar(**ALL_NO_GRACE)
    login(client, "carol")
    token = await csrf(client)
    begun = await client.post("/mfa/api/totp/begin", headers={"X-CSRF-Token": token})
    code = pyotp.TOTP((await begun.json())["secret"]).now()

    refused = await client.post(
        "/mfa/api/totp/finish", params={"code": code}, headers={"X-CSRF-Token": token}
    )
    assert refused.status == 400
    status = await _status(client)
    assert not status["enrolled"]
    assert not status["methods"]["totp"]
    accepted = await client.post(
        "/mfa/api/totp/finish", json={"code": code}, headers={"X-CSRF-Token": token}
    )
    assert accepted.status == 200, await accepted.text()
    assert (await _status(client))["enrolled"]
