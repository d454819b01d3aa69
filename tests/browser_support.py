"""Helpers for the end-to-end browser tests: a demo console with a real sidecar in front of it,
both on real loopback ports, and Debian Chromium driven by Playwright (async API).

The browser talks to ``http://localhost:<port>``: ``localhost`` is a secure context, so
WebAuthn works over plain http with ``rp_id: localhost``. Passkeys come from a CDP WebAuthn
virtual authenticator; nothing is ever downloaded (Chromium is the Debian package).
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from playwright.async_api import Browser, BrowserContext, CDPSession, Page

from sidecar.app import build_app
from sidecar.demo_console import build_demo_console
from tests.conftest import make_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser-flows"
PASSWORD = "demo"  # every demo console user's password

#: A platform authenticator with user verification that always says yes.
AUTHENTICATOR: dict[str, Any] = {
    "protocol": "ctap2",
    "ctap2Version": "ctap2_1",
    "transport": "internal",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
    "automaticPresenceSimulation": True,
}


def _listening_socket() -> socket.socket:
    """A socket already bound to a free loopback port: the port is known before the app is
    built (the sidecar's ``mfa.origin`` must name it) and nobody can take it meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def _serve(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


@dataclass(frozen=True)
class Stack:
    """The demo console and the sidecar in front of it. ``base`` is what the browser uses."""

    base: str
    console_url: str


@asynccontextmanager
async def running_stack(
    tmp_path: Path, *, security: dict[str, Any] | None = None, **sections: Any
) -> AsyncIterator[Stack]:
    """Serve the demo console and a sidecar on loopback ports; ``security`` defaults to
    policy ``all`` with no grace period."""
    console_sock = _listening_socket()
    sidecar_sock = _listening_socket()
    port = sidecar_sock.getsockname()[1]
    console_url = f"http://127.0.0.1:{console_sock.getsockname()[1]}"
    base = f"http://localhost:{port}"
    config = make_config(
        tmp_path,
        console_url,
        security=security or {"mfa_policy": "all", "grace_period": "0s"},
        mfa={"rp_id": "localhost", "origin": base, "session": {"secure": False}},
        **sections,
    )
    runners: list[web.AppRunner] = []
    try:
        runners.append(await _serve(build_demo_console(), console_sock))
        runners.append(await _serve(build_app(config), sidecar_sock))
        yield Stack(base=base, console_url=console_url)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        console_sock.close()
        sidecar_sock.close()


@dataclass
class Tab:
    """One browser context with one page, what went wrong in it, and its CDP session."""

    context: BrowserContext
    page: Page
    base: str
    cdp: CDPSession
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    authenticator_id: str | None = None

    async def add_authenticator(self, **overrides: Any) -> str:
        await self.cdp.send("WebAuthn.enable", {"enableUI": False})
        answer = await self.cdp.send(
            "WebAuthn.addVirtualAuthenticator", {"options": {**AUTHENTICATOR, **overrides}}
        )
        self.authenticator_id = str(answer["authenticatorId"])
        return self.authenticator_id

    async def credentials(self) -> list[dict[str, Any]]:
        """The credentials the virtual authenticator holds (private keys included)."""
        assert self.authenticator_id is not None, "no virtual authenticator in this tab"
        answer = await self.cdp.send(
            "WebAuthn.getCredentials", {"authenticatorId": self.authenticator_id}
        )
        creds: list[dict[str, Any]] = answer["credentials"]
        return creds

    async def import_credential(self, credential: dict[str, Any]) -> None:
        assert self.authenticator_id is not None, "no virtual authenticator in this tab"
        await self.cdp.send(
            "WebAuthn.addCredential",
            {"authenticatorId": self.authenticator_id, "credential": credential},
        )

    async def shot(self, name: str, *, full_page: bool = True) -> Path:
        """Save a screenshot. ``full_page=False`` shows what the user sees: the page's status
        message is sticky, and a full-page capture draws it over the page at scroll height."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path

    async def status(self) -> str:
        return await self.page.locator("#mfa-status").inner_text()

    def next_param(self) -> str | None:
        """The ``next`` query parameter of the current URL, decoded."""
        values = parse_qs(urlsplit(self.page.url).query).get("next")
        return values[0] if values else None

    def unexpected_console_errors(self) -> list[str]:
        """Console errors other than a missing favicon (the demo console has none)."""
        return [e for e in self.console_errors if not e.endswith("/favicon.ico")]

    def console_errors_except_4xx(self) -> list[str]:
        """Also without the API's deliberate 4xx answers (a wrong code is a 400)."""
        return [
            e
            for e in self.unexpected_console_errors()
            if not re.search(r"the server responded with a status of 4\d\d", e)
        ]


async def open_tab(browser: Browser, stack: Stack, *, init_script: str | None = None) -> Tab:
    """A fresh context (no cookies) with one page."""
    context = await browser.new_context(base_url=stack.base, viewport={"width": 900, "height": 900})
    context.set_default_timeout(10_000)
    if init_script:
        await context.add_init_script(init_script)
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    tab = Tab(context=context, page=page, base=stack.base, cdp=cdp)
    page.on("pageerror", lambda exc: tab.page_errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: (
            tab.console_errors.append(f"{msg.text} @ {msg.location.get('url')}")
            if msg.type == "error"
            else None
        ),
    )
    return tab


async def console_login(tab: Tab, user: str, wanted: str) -> None:
    """Ask for ``wanted`` anonymously; the console sends us to its login form; log in there.

    Everything goes through the sidecar: the anonymous request and the login form pass its
    gate, the console's 303 back to ``wanted`` is where the gate steps in.
    """
    page = tab.page
    await page.goto(wanted)
    await page.wait_for_url(re.compile(r"/login\?next="))
    await page.get_by_label("Username or email").fill(user)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_load_state("load")
