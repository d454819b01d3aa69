"""The MFA pages as a user meets them: rendered HTML, static assets, and the flows in Chromium.

The browser tests run the real pages and ``mfa.js`` against a stub of the JSON API (real
py_webauthn and pyotp behind it, a virtual WebAuthn authenticator in front), under the strict
CSP the pages promise to allow.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyotp
import pytest
import segno
import webauthn
from aiohttp import web
from aiohttp.test_utils import TestServer
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from sidecar.mfa import pages
from sidecar.mfa.pages import (
    PageContext,
    render_error,
    render_grace_interstitial,
    render_setup,
    render_signin_required,
    render_verify,
    static_file,
)
from tests.mfa.page_stub import PageServing

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
EVIL_USER = '<script>alert("u")</script>'
STATIC_DIR = Path(pages.__file__).parent / "static"


def context(**changes: Any) -> PageContext:
    values: dict[str, Any] = {
        "prefix": "/mfa",
        "csrf_token": "csrf-token-123",
        "user": "alice@example.com",
        "role": "admin",
        "next_path": "/projects?tab=1",
        "app_name": "Console",
    }
    values.update(changes)
    return PageContext(**values)


class Page(HTMLParser):
    """Elements in document order with their attributes, and the visible text."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.markup = markup
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self._text: list[str] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self._text).split())

    def ids(self) -> list[str]:
        return [str(attrs["id"]) for _, attrs in self.elements if attrs.get("id")]

    def by_id(self, element_id: str) -> dict[str, str | None]:
        for _, attrs in self.elements:
            if attrs.get("id") == element_id:
                return attrs
        raise AssertionError(f"no element with id {element_id!r}")

    def has_id(self, element_id: str) -> bool:
        return element_id in self.ids()

    def position(self, element_id: str) -> int:
        return self.ids().index(element_id)

    def main(self) -> dict[str, str | None]:
        return next(attrs for tag, attrs in self.elements if tag == "main")

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.elements if name == tag]

    def label_for(self, element_id: str) -> str:
        """The text of the <label for=element_id>, from the markup."""
        match = re.search(rf'<label for="{re.escape(element_id)}">(.*?)</label>', self.markup, re.S)
        assert match, f"no label for {element_id!r}"
        return " ".join(match.group(1).split())


def setup_page(ctx: PageContext | None = None, **kwargs: Any) -> Page:
    options: dict[str, Any] = {
        "required": False,
        "grace_deadline": None,
        "enrolled": False,
        "has_totp": False,
        "now": NOW,
    }
    options.update(kwargs)
    return Page(render_setup(ctx or context(), **options))


def verify_page(ctx: PageContext | None = None, **kwargs: Any) -> Page:
    options: dict[str, Any] = {
        "has_totp": True,
        "has_passkeys": True,
        "locked_until": None,
        "now": NOW,
    }
    options.update(kwargs)
    return Page(render_verify(ctx or context(), **options))


def grace_page(ctx: PageContext | None = None, **kwargs: Any) -> Page:
    options: dict[str, Any] = {
        "deadline": NOW + timedelta(days=2),
        "continue_url": "/projects?tab=1",
        "now": NOW,
    }
    options.update(kwargs)
    return Page(render_grace_interstitial(ctx or context(), **options))


ALL_PAGES: dict[str, Callable[[PageContext], str]] = {
    "setup": lambda ctx: render_setup(
        ctx, required=True, grace_deadline=NOW + timedelta(days=1), enrolled=False, has_totp=False
    ),
    "setup-enrolled": lambda ctx: render_setup(
        ctx, required=False, grace_deadline=None, enrolled=True, has_totp=True
    ),
    "verify": lambda ctx: render_verify(ctx, has_totp=True, has_passkeys=True, locked_until=None),
    "verify-locked": lambda ctx: render_verify(
        ctx, has_totp=True, has_passkeys=True, locked_until=datetime.now(UTC) + timedelta(hours=1)
    ),
    "grace": lambda ctx: render_grace_interstitial(
        ctx, deadline=NOW, continue_url=ctx.next_path, now=NOW - timedelta(hours=5)
    ),
    "signin-required": lambda ctx: render_signin_required(ctx.prefix, ctx.app_name),
    "error": lambda ctx: render_error("Oops <b>", "Bad & worse", prefix=ctx.prefix),
}


# --- escaping and safe targets ------------------------------------------------------------


@pytest.mark.parametrize("name", ["setup", "verify", "grace"])
def test_user_name_and_next_path_are_escaped(name: str) -> None:
    ctx = context(user=EVIL_USER, next_path='/x?q="><script>alert(1)</script>', role="<i>")
    markup = ALL_PAGES[name](ctx)
    page = Page(markup)

    assert "<script>alert" not in markup
    assert "<i>" not in markup
    assert EVIL_USER in page.text
    assert page.main()["data-user"] == EVIL_USER
    assert page.main()["data-next-path"] == ctx.next_path


@pytest.mark.parametrize(
    "next_path",
    [
        pytest.param("//evil.example/", id="protocol-relative"),
        pytest.param("/\\evil.example/", id="backslash"),
        pytest.param("https://evil.example/", id="absolute"),
        pytest.param("javascript:alert(1)", id="javascript"),
        pytest.param("/ok\r\nSet-Cookie: x=1", id="control-chars"),
        pytest.param("", id="empty"),
    ],
)
def test_unsafe_next_paths_become_the_root(next_path: str) -> None:
    ctx = context(next_path=next_path)

    assert setup_page(ctx).main()["data-next-path"] == "/"
    assert verify_page(ctx).main()["data-next-path"] == "/"
    assert [link["href"] for link in setup_page(ctx).all("a")] == ["/"]
    links = grace_page(ctx, continue_url=next_path).all("a")
    assert [link["href"] for link in links] == ["/mfa/setup?next=%2F", "/"]


@pytest.mark.parametrize("name", sorted(ALL_PAGES))
def test_pages_use_the_configured_prefix(name: str) -> None:
    page = Page(ALL_PAGES[name](context(prefix="/_sidecar/")))

    assert [link["href"] for link in page.all("link")] == ["/_sidecar/static/mfa.css"]
    scripts = [script["src"] for script in page.all("script")]
    assert scripts in ([], ["/_sidecar/static/mfa.js"])
    if name.startswith(("setup", "verify")):
        assert scripts == ["/_sidecar/static/mfa.js"]
        assert page.main()["data-prefix"] == "/_sidecar"
        assert page.main()["data-csrf-token"] == "csrf-token-123"
    if name == "grace":
        assert page.all("a")[0]["href"] == "/_sidecar/setup?next=%2Fprojects%3Ftab%3D1"
    assert "/mfa/" not in page.markup


@pytest.mark.parametrize("name", sorted(ALL_PAGES))
def test_pages_are_csp_friendly(name: str) -> None:
    """Nothing that `default-src 'self'; img-src 'self' data:; style-src 'self'` blocks."""
    page = Page(ALL_PAGES[name](context(user=EVIL_USER)))

    assert all(script.get("src") for script in page.all("script")), "inline <script>"
    assert not page.all("style")
    for tag, attrs in page.elements:
        assert "style" not in attrs, f"style= on <{tag}>"
        assert not [a for a in attrs if a.startswith("on")], f"event handler on <{tag}>"
        for url_attr in ("src", "href", "action"):
            url = attrs.get(url_attr)
            assert url is None or (url.startswith("/") and not url.startswith("//")), url
    assert any(attrs.get("name") == "viewport" for attrs in page.all("meta"))


# --- setup ---------------------------------------------------------------------------------


def test_setup_offers_a_passkey_first_and_the_app_as_an_alternative() -> None:
    page = setup_page()

    assert page.all("h1")
    assert "Set up passkey MFA" in page.text
    assert page.position("passkey-section") < page.position("totp-section")
    assert "Face ID, Touch ID, Windows Hello" in page.text
    assert page.by_id("passkey-name")["value"] == "Passkey"
    assert page.label_for("passkey-name") == "Name for this passkey"
    toggle = page.by_id("show-totp")
    assert toggle["aria-controls"] == "totp-section"
    assert "Use an authenticator app instead" in page.text
    # The app section waits behind the toggle; the recovery step behind a finished enrollment.
    assert "hidden" in page.by_id("totp-section")
    assert "hidden" in page.by_id("recovery-step")
    assert "Create passkey" in page.text
    assert "Show QR code" in page.text


def test_setup_code_input_suits_a_phone_keyboard_and_autofill() -> None:
    code = setup_page().by_id("totp-code")

    assert code["inputmode"] == "numeric"
    assert code["autocomplete"] == "one-time-code"
    pattern = code["pattern"]
    assert pattern is not None
    # The HTML pattern is a whole-value match, as fullmatch is.
    assert re.fullmatch(pattern, "123456")
    assert re.fullmatch(pattern, "123 456")
    assert not re.fullmatch(pattern, "12345")
    assert not re.fullmatch(pattern, "12345a")
    assert setup_page().label_for("totp-code") == "6-digit code from the app"
    assert "Verify and turn on" in setup_page().text


def test_setup_recovery_step_needs_the_saved_checkbox() -> None:
    page = setup_page()

    assert page.by_id("recovery-saved")["type"] == "checkbox"
    assert "required" in page.by_id("recovery-saved")
    assert "disabled" in page.by_id("recovery-continue")
    assert "I saved my recovery codes" in page.text
    assert page.has_id("recovery-copy")
    assert page.has_id("recovery-download")


@pytest.mark.parametrize(
    ("kwargs", "expected", "absent", "can_skip"),
    [
        pytest.param({"required": False}, [], ["requires MFA", "blocked"], True, id="optional"),
        pytest.param(
            {"required": True, "grace_deadline": NOW + timedelta(days=2, hours=1)},
            ["requires MFA", "before 3 March 2025, 13:00 UTC (in 2 days)"],
            ["blocked"],
            True,
            id="in-grace",
        ),
        pytest.param(
            {"required": True, "grace_deadline": NOW + timedelta(minutes=30)},
            ["before 1 March 2025, 12:30 UTC (in 30 minutes)"],
            ["blocked"],
            True,
            id="grace-nearly-over",
        ),
        pytest.param(
            {"required": True, "grace_deadline": NOW - timedelta(hours=1)},
            ["requires MFA", "access to Console is blocked until you set it up"],
            [],
            False,
            id="grace-over",
        ),
        pytest.param(
            {"required": True, "grace_deadline": (NOW - timedelta(hours=1)).replace(tzinfo=None)},
            ["blocked"],
            [],
            False,
            id="naive-deadline-is-utc",
        ),
        pytest.param(
            {"required": True, "grace_deadline": NOW - timedelta(hours=1), "enrolled": True},
            ["Add a sign-in method"],
            ["requires MFA", "blocked", "Set up passkey MFA"],
            True,
            id="enrolled-adds-a-method",
        ),
    ],
)
def test_setup_tells_the_deadline(
    kwargs: dict[str, Any], expected: list[str], absent: list[str], can_skip: bool
) -> None:
    page = setup_page(**kwargs)

    for text in expected:
        assert text in page.text
    for text in absent:
        assert text not in page.text
    assert page.has_id("setup-footer") is can_skip


def test_setup_mentions_an_existing_authenticator_app() -> None:
    assert "already set up" in setup_page(enrolled=True, has_totp=True).text
    assert "already set up" not in setup_page(enrolled=True, has_totp=False).text


# --- verify --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("has_passkeys", "has_totp"),
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["both", "passkey-only", "app-only", "recovery-only"],
)
def test_verify_offers_exactly_the_enrolled_methods(has_passkeys: bool, has_totp: bool) -> None:
    page = verify_page(has_passkeys=has_passkeys, has_totp=has_totp)

    assert "Confirm it's you" in page.text
    assert page.has_id("passkey-verify-button") is has_passkeys
    assert ("Use passkey" in page.text) is has_passkeys
    assert page.has_id("totp-verify-form") is has_totp
    assert ("authenticator app" in page.text) is has_totp
    assert "Use a recovery code" in page.text
    if has_passkeys:
        assert page.position("passkey-verify-button") < page.position("recovery-details")
    if has_passkeys and has_totp:
        assert page.position("passkey-verify-button") < page.position("totp-verify-form")
    # With nothing else to offer, the recovery code form is open from the start.
    assert ("open" in page.by_id("recovery-details")) is not (has_passkeys or has_totp)


def test_verify_while_locked_out_says_until_when_and_disables_the_forms() -> None:
    page = verify_page(locked_until=NOW + timedelta(minutes=12))

    assert "hidden" not in page.by_id("lockout-notice")
    assert "Too many failed attempts" in page.text
    assert "try again after 1 March 2025, 12:12 UTC (in 12 minutes)" in page.text
    assert page.main()["data-locked-until"] == "2025-03-01T12:12:00+00:00"
    lockable = [attrs for _, attrs in page.elements if "data-lockable" in attrs]
    assert len(lockable) == 3
    assert all("disabled" in attrs for attrs in lockable)


@pytest.mark.parametrize(
    "locked_until", [None, NOW - timedelta(seconds=1), NOW], ids=["never", "expired", "now"]
)
def test_verify_without_a_current_lockout_is_usable(locked_until: datetime | None) -> None:
    page = verify_page(locked_until=locked_until)

    assert "hidden" in page.by_id("lockout-notice")
    assert "Too many failed attempts" not in page.text
    assert "data-locked-until" not in page.main()
    # Disabled only until mfa.js runs (the browser tests show it enabling them), so that a
    # browser without script can't submit them.
    disabled = [attrs for _, attrs in page.elements if "disabled" in attrs]
    assert disabled
    assert all("data-needs-script" in attrs for attrs in disabled)


# --- the other pages -----------------------------------------------------------------------


def test_grace_interstitial_offers_setup_now_or_continue() -> None:
    page = grace_page(
        context(next_path="/reports?a=1&b=2"),
        deadline=datetime(2025, 3, 3, 12, 0, tzinfo=UTC),
        continue_url="/reports?a=1&b=2",
    )

    assert "Your organization requires MFA" in page.text
    assert "before 3 March 2025, 12:00 UTC (in 2 days)" in page.text
    links = {(link.get("class") or "").split()[-1]: link["href"] for link in page.all("a")}
    assert links == {
        "button-primary": "/mfa/setup?next=%2Freports%3Fa%3D1%26b%3D2",
        "button": "/reports?a=1&b=2",
    }
    assert "Set up now" in page.text
    assert "Continue" in page.text
    assert not page.all("script")  # works without JavaScript


def test_signin_required_points_to_the_console() -> None:
    page = Page(render_signin_required("/mfa", "Acme <Console>"))

    assert "Sign in to Acme <Console> first" in page.text
    assert "<Console>" not in page.markup
    assert [link["href"] for link in page.all("a")] == ["/"]


def test_error_page_escapes_and_works_without_a_prefix() -> None:
    page = Page(render_error("Bad <request>", "It's <b>broken</b>", status_hint="HTTP 400"))

    assert "Bad <request>" in page.text
    assert "It's <b>broken</b>" in page.text
    assert "<b>" not in page.markup
    assert "HTTP 400" in page.text
    assert not page.all("link")
    assert not page.all("script")


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(seconds=30), "in less than a minute"),
        (timedelta(minutes=1), "in 1 minute"),
        (timedelta(minutes=59, seconds=59), "in 59 minutes"),
        (timedelta(hours=1), "in 1 hour"),
        (timedelta(hours=35), "in 35 hours"),
        (timedelta(hours=36), "in 2 days"),
        (timedelta(hours=71, minutes=59), "in 3 days"),
        (timedelta(days=2), "in 2 days"),
        (-timedelta(seconds=10), "just now"),
        (-timedelta(hours=3), "3 hours ago"),
        (-timedelta(days=1, hours=1), "25 hours ago"),
        (-timedelta(days=4), "4 days ago"),
    ],
    ids=str,
)
def test_relative_times_read_naturally(delta: timedelta, expected: str) -> None:
    assert pages.format_relative(NOW + delta, NOW) == expected


# --- static assets -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mfa.css", "mfa.js"])
def test_static_file_serves_the_assets(name: str) -> None:
    assert static_file(name) == (STATIC_DIR / name).read_bytes()
    assert name in pages.STATIC_FILES


@pytest.mark.parametrize(
    "name",
    [
        "",
        "pages.py",
        "../pages.py",
        "static/mfa.js",
        "mfa.js/../../pages.py",
        "/etc/passwd",
        "MFA.JS",
        "mfa.js ",
        "..",
        "mfa.css%00",
    ],
)
def test_static_file_refuses_anything_else(name: str) -> None:
    assert static_file(name) is None


def test_every_element_the_script_looks_up_exists_on_a_page() -> None:
    script = (STATIC_DIR / "mfa.js").read_text()
    wanted = set(re.findall(r"""byId\(["']([\w-]+)["']\)""", script))
    wanted |= set(re.findall(r'"([\w-]+)"', script.split("for (const id of [")[1].split("]")[0]))
    rendered = (
        set(setup_page().ids())
        | set(setup_page(required=True).ids())  # the requirement notice, hidden on success
        | set(verify_page().ids())
    )

    assert wanted, "the regex no longer finds lookups"
    assert wanted - rendered == set()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
def test_script_parses() -> None:
    node = shutil.which("node")
    assert node
    result = subprocess.run(
        [node, "--check", str(STATIC_DIR / "mfa.js")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --- in a real browser ---------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
RP_ID = "localhost"
RECOVERY_CODES = [f"AAAAA-{n:05d}" for n in range(10)]


@dataclass
class StubApi(PageServing):
    """The JSON API as the lead specifies it, backed by real pyotp and py_webauthn."""

    origin: str = ""
    first_enrollment: bool = True
    lock_after_failures: int | None = None
    totp_secret: str | None = None
    challenge: bytes | None = None
    credential: tuple[bytes, bytes, int] | None = None  # id, public key, sign count
    calls: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    failures: int = 0

    def app(self, render: dict[str, Callable[[], str]]) -> web.Application:
        app = web.Application(middlewares=[self.csp])
        for path, make in render.items():
            app.router.add_get(path, self.page(make))
        app.router.add_get("/mfa/static/{name}", self.static)
        app.router.add_get("/done", self.page(lambda: "<!doctype html><title>done</title>done"))
        app.router.add_get("/favicon.ico", self.page(lambda: ""))
        app.router.add_post("/mfa/api/{action:.+}", self.api)
        return app

    async def api(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        body: dict[str, Any] = await request.json()
        self.calls.append((action, request.headers.get("X-CSRF-Token"), body))
        if request.headers.get("X-CSRF-Token") != "csrf-token-123":
            return error(403, "csrf_failed", "Reload the page and try again.")
        codes = RECOVERY_CODES if self.first_enrollment else None
        if action == "totp/begin":
            self.totp_secret = pyotp.random_base32(32)
            uri = pyotp.TOTP(self.totp_secret).provisioning_uri(name="alice", issuer_name="Console")
            svg = segno.make(uri, error="m").svg_inline(scale=4, title="QR")
            return web.json_response(
                {"secret": self.totp_secret, "otpauth_uri": uri, "qr_svg": svg}
            )
        if action in ("totp/finish", "verify/totp", "verify/recovery"):
            if self.lock_after_failures is not None and self.failures >= self.lock_after_failures:
                until = (datetime.now(UTC) + timedelta(minutes=15)).isoformat()
                return web.json_response(
                    {"error": "locked_out", "message": "Too many tries.", "locked_until": until},
                    status=429,
                )
            good = action == "verify/recovery" and body["code"] in RECOVERY_CODES
            good = good or bool(
                self.totp_secret and pyotp.TOTP(self.totp_secret).verify(body["code"])
            )
            if not good:
                self.failures += 1
                return error(400, "invalid_code", "That code didn't work. Check it and try again.")
            if action == "totp/finish":
                return web.json_response({"recovery_codes": codes})
            return web.json_response({"verified": True, "recovery_codes_left": 9})
        if action == "passkey/begin":
            options = webauthn.generate_registration_options(
                rp_id=RP_ID,
                rp_name="Console",
                user_name="alice",
                user_id=b"user-alice",
                authenticator_selection=AuthenticatorSelectionCriteria(
                    resident_key=ResidentKeyRequirement.PREFERRED,
                    user_verification=UserVerificationRequirement.REQUIRED,
                ),
                exclude_credentials=[PublicKeyCredentialDescriptor(id=b"\xfb\xff-other-cred")],
            )
            self.challenge = options.challenge
            return web.Response(
                text=webauthn.options_to_json(options), content_type="application/json"
            )
        if action == "passkey/finish":
            assert self.challenge is not None
            registered = webauthn.verify_registration_response(
                credential=body["credential"],
                expected_challenge=self.challenge,
                expected_rp_id=RP_ID,
                expected_origin=self.origin,
                require_user_verification=True,
            )
            self.credential = (
                registered.credential_id,
                registered.credential_public_key,
                registered.sign_count,
            )
            return web.json_response({"recovery_codes": codes})
        if action == "verify/passkey/begin":
            assert self.credential is not None
            request_options = webauthn.generate_authentication_options(
                rp_id=RP_ID,
                allow_credentials=[PublicKeyCredentialDescriptor(id=self.credential[0])],
                user_verification=UserVerificationRequirement.REQUIRED,
            )
            self.challenge = request_options.challenge
            return web.Response(
                text=webauthn.options_to_json(request_options), content_type="application/json"
            )
        if action == "verify/passkey/finish":
            assert self.credential is not None
            assert self.challenge is not None
            webauthn.verify_authentication_response(
                credential=body["credential"],
                expected_challenge=self.challenge,
                expected_rp_id=RP_ID,
                expected_origin=self.origin,
                credential_public_key=self.credential[1],
                credential_current_sign_count=self.credential[2],
                require_user_verification=True,
            )
            return web.json_response({"verified": True})
        return error(404, "not_found", action)


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@dataclass
class Browser:
    page: Any  # playwright.async_api.Page
    base: str
    problems: list[str]

    async def open(self, path: str) -> None:
        await self.page.goto(self.base + path)
        await self.page.wait_for_load_state("load")

    async def status(self) -> str:
        text: str = await self.page.locator("#mfa-status").inner_text()
        return text

    async def wait_for_next_page(self) -> None:
        """Wait for the flow to reach ``/done``; on timeout, say what the page said instead."""
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        try:
            await self.page.wait_for_url("**/done", timeout=10_000)
        except PlaywrightTimeout:
            status = await self.status()
            raise AssertionError(f"stuck; status {status!r}, console {self.problems}") from None


# Removes the native JSON helpers so the fallback encoder in mfa.js does the work.
NO_JSON_HELPERS = """
delete PublicKeyCredential.parseCreationOptionsFromJSON;
delete PublicKeyCredential.parseRequestOptionsFromJSON;
delete PublicKeyCredential.prototype.toJSON;
"""
NO_WEBAUTHN = "delete window.PublicKeyCredential;"
CANCELLING_AUTHENTICATOR = """
navigator.credentials.create = () => Promise.reject(new DOMException("no", "NotAllowedError"));
"""

OpenBrowser = Callable[..., Awaitable[Browser]]


@pytest.fixture
def chromium_available() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (CI provides Debian Chromium)")
    pytest.importorskip("playwright.async_api", reason="playwright is not installed")


@pytest.fixture
async def open_browser(
    chromium_available: None, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> AsyncIterator[OpenBrowser]:
    """``await open_browser(stub, pages, init_script=..., authenticator=True)``."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )

        async def factory(
            stub: StubApi,
            routes: dict[str, Callable[[], str]],
            *,
            init_script: str = "",
            authenticator: bool = True,
        ) -> Browser:
            server = await aiohttp_server(stub.app(routes))
            stub.origin = f"http://localhost:{server.port}"
            context = await browser.new_context(
                base_url=stub.origin, permissions=["clipboard-read", "clipboard-write"]
            )
            if init_script:
                await context.add_init_script(init_script)
            page = await context.new_page()
            page.set_default_timeout(10_000)
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type == "error" else None,
            )
            if authenticator:
                cdp = await context.new_cdp_session(page)
                await cdp.send("WebAuthn.enable")
                await cdp.send(
                    "WebAuthn.addVirtualAuthenticator",
                    {
                        "options": {
                            "protocol": "ctap2",
                            "ctap2Version": "ctap2_1",
                            "transport": "internal",
                            "hasResidentKey": True,
                            "hasUserVerification": True,
                            "isUserVerified": True,
                            "automaticPresenceSimulation": True,
                        }
                    },
                )
            return Browser(page=page, base=stub.origin, problems=problems)

        try:
            yield factory
        finally:
            await browser.close()


def browser_routes(**setup: Any) -> dict[str, Callable[[], str]]:
    ctx = context(next_path="/done")
    options: dict[str, Any] = {"required": True, "grace_deadline": None, "enrolled": False}
    options.update(setup)
    return {
        "/mfa/setup": lambda: render_setup(ctx, has_totp=False, **options),
        "/mfa/verify": lambda: render_verify(
            ctx, has_totp=True, has_passkeys=True, locked_until=None
        ),
    }


def expected_console_noise(problems: list[str]) -> list[str]:
    """Console errors other than the API's deliberate 4xx answers."""
    return [p for p in problems if "the server responded with a status of 4" not in p]


@pytest.mark.browser
async def test_browser_authenticator_app_enrollment_shows_recovery_codes(
    open_browser: OpenBrowser,
) -> None:
    stub = StubApi()
    browser = await open_browser(stub, browser_routes(), authenticator=False)
    page = browser.page
    await browser.open("/mfa/setup")

    await page.get_by_role("button", name="Use an authenticator app instead").click()
    assert await page.locator("#totp-section").is_visible()
    await page.get_by_role("button", name="Show QR code").click()
    await page.locator("#totp-qr svg").wait_for()
    assert stub.totp_secret is not None
    shown = await page.locator("#totp-secret").inner_text()
    assert shown.replace(" ", "") == stub.totp_secret
    assert " " in shown

    await page.get_by_label("6-digit code from the app").fill("000000")
    await page.get_by_role("button", name="Verify and turn on").click()
    # A locator wait, not wait_for_function: the page's CSP forbids the eval that needs.
    await page.locator("#mfa-status[data-kind='error']").wait_for()
    assert "didn't work" in await browser.status()
    assert await page.get_by_label("6-digit code from the app").get_attribute("aria-invalid")

    code = pyotp.TOTP(stub.totp_secret).now()
    await page.get_by_label("6-digit code from the app").fill(f"{code[:3]} {code[3:]}")
    await page.get_by_role("button", name="Verify and turn on").click()
    await page.locator("#recovery-step").wait_for()
    assert await page.locator("#recovery-codes li").all_inner_texts() == RECOVERY_CODES
    assert not await page.locator("#passkey-section").is_visible()
    continue_button = page.get_by_role("button", name="Continue")
    assert await continue_button.is_disabled()

    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download").click()
    download = await download_info.value
    assert download.suggested_filename == "recovery-codes.txt"
    saved = await asyncio.to_thread(Path(await download.path()).read_text)
    assert all(code in saved for code in RECOVERY_CODES)

    await page.get_by_label("I saved my recovery codes").check()
    await continue_button.click()
    await browser.wait_for_next_page()

    assert [call[0] for call in stub.calls] == ["totp/begin", "totp/finish", "totp/finish"]
    assert {call[1] for call in stub.calls} == {"csrf-token-123"}
    assert stub.calls[-1][2] == {"code": code}
    assert expected_console_noise(browser.problems) == []


@pytest.mark.browser
@pytest.mark.parametrize("init_script", ["", NO_JSON_HELPERS], ids=["native-json", "fallback"])
async def test_browser_passkey_enrollment_then_verification(
    open_browser: OpenBrowser, init_script: str
) -> None:
    stub = StubApi(first_enrollment=False)
    browser = await open_browser(stub, browser_routes(), init_script=init_script)
    page = browser.page
    await browser.open("/mfa/setup")
    if init_script:
        assert await page.evaluate("typeof PublicKeyCredential.parseCreationOptionsFromJSON") == (
            "undefined"
        )

    await page.get_by_label("Name for this passkey").fill("Work laptop")
    await page.get_by_role("button", name="Create passkey").click()
    await browser.wait_for_next_page()  # not the first enrollment: no recovery codes
    assert stub.credential is not None
    assert stub.calls[-1][2]["name"] == "Work laptop"

    await browser.open("/mfa/verify")
    await page.get_by_role("button", name="Use passkey").click()
    await browser.wait_for_next_page()

    assert [call[0] for call in stub.calls] == [
        "passkey/begin",
        "passkey/finish",
        "verify/passkey/begin",
        "verify/passkey/finish",
    ]
    assert browser.problems == []


@pytest.mark.browser
async def test_browser_cancelled_passkey_leads_to_the_authenticator_app(
    open_browser: OpenBrowser,
) -> None:
    stub = StubApi()
    browser = await open_browser(stub, browser_routes(), init_script=CANCELLING_AUTHENTICATOR)
    page = browser.page
    await browser.open("/mfa/setup")

    await page.get_by_role("button", name="Create passkey").click()
    await page.locator("#totp-section").wait_for()

    assert "wasn't created" in await browser.status()
    assert "authenticator app instead" in await browser.status()
    assert await page.evaluate("document.activeElement.id") == "totp-section"
    assert (
        await page.get_by_role("button", name="Use an authenticator app instead").get_attribute(
            "aria-expanded"
        )
        == "true"
    )


@pytest.mark.browser
async def test_browser_without_webauthn_goes_straight_to_the_app(
    open_browser: OpenBrowser,
) -> None:
    stub = StubApi()
    browser = await open_browser(stub, browser_routes(), init_script=NO_WEBAUTHN)
    page = browser.page

    await browser.open("/mfa/setup")
    assert await page.locator("#totp-section").is_visible()
    assert await page.locator("#passkey-unsupported").is_visible()
    assert not await page.locator("#passkey-form").is_visible()

    await browser.open("/mfa/verify")
    assert not await page.get_by_role("button", name="Use passkey").is_visible()
    assert await page.locator("#passkey-verify-unsupported").is_visible()
    assert browser.problems == []


@pytest.mark.browser
async def test_browser_verify_lockout_disables_the_forms(open_browser: OpenBrowser) -> None:
    stub = StubApi(lock_after_failures=1)
    browser = await open_browser(stub, browser_routes(), authenticator=False)
    page = browser.page
    await browser.open("/mfa/verify")

    code_input = page.get_by_label("6-digit code from your authenticator app")
    await code_input.fill("123456")
    await code_input.press("Enter")
    # A locator wait, not wait_for_function: the page's CSP forbids the eval that needs.
    await page.locator("#mfa-status[data-kind='error']").wait_for()
    assert "didn't work" in await browser.status()

    await code_input.fill("654321")
    await code_input.press("Enter")
    await page.locator("#lockout-notice").wait_for()
    assert (
        "Too many tries. You can try again after"
        in await page.locator("#lockout-text").inner_text()
    )
    assert await code_input.is_disabled()
    assert await page.get_by_role("button", name="Use passkey").is_disabled()
    await page.get_by_text("Use a recovery code").click()
    assert await page.get_by_label("Recovery code").is_disabled()
    assert expected_console_noise(browser.problems) == []


@pytest.mark.browser
async def test_browser_recovery_code_verifies(open_browser: OpenBrowser) -> None:
    stub = StubApi()
    browser = await open_browser(stub, browser_routes(), authenticator=False)
    page = browser.page
    await browser.open("/mfa/verify")

    await page.get_by_text("Use a recovery code").click()
    await page.get_by_label("Recovery code").fill(RECOVERY_CODES[3])
    await page.get_by_role("button", name="Use recovery code").click()
    await browser.wait_for_next_page()
    assert stub.calls == [("verify/recovery", "csrf-token-123", {"code": RECOVERY_CODES[3]})]
