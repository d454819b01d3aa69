"""The Security and Audit pages as people meet them: rendered HTML, and security.js in Chromium.

The browser tests run the real pages and ``security.js`` against a scripted stub of the JSON
API (answers as ``routes.py`` and ``admin.py`` give them) under the strict CSP the pages
promise to allow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.mfa import pages
from sidecar.mfa.pages import PageContext, static_file
from sidecar.mfa.security_pages import (
    IP_ORDER_NOTE,
    MANAGED_BY_CONFIG_NOTE,
    describe_duration,
    describe_grace,
    describe_lockout,
    preview_text,
    render_audit,
    render_security,
)
from tests.mfa.page_stub import PageServing

STATIC_DIR = Path(pages.__file__).parent / "static"
EVIL = '<script>alert("x")</script>'
CHROMIUM = Path("/usr/bin/chromium")

METHODS: dict[str, Any] = {
    "totp": True,
    "passkeys": [
        {
            "id": "cred-1",
            "name": "Work laptop",
            "created_at": "2025-03-01T12:00:00+00:00",
            "last_used_at": "2025-03-02T08:30:00+00:00",
        },
        {"id": "cred-2", "name": "Phone", "created_at": "2025-03-03T09:00:00+00:00"},
    ],
    "recovery_codes_left": 8,
}
SETTINGS: dict[str, Any] = {
    "mfa_policy": "admins",
    "grace_period_seconds": 72 * 3600.0,
    "ip_allowlist": ["10.0.0.0/8", "2001:db8::/32"],
    "ip_denylist": ["10.9.0.0/16"],
    "managed_by": "store",
    "version": 7,
}
PREVIEW = {"users": 6, "enrolled": 3, "grace": 2, "blocked": 1, "not_required": 0}


def context(**changes: Any) -> PageContext:
    values: dict[str, Any] = {
        "prefix": "/mfa",
        "csrf_token": "csrf-token-123",
        "user": "alice@example.com",
        "role": "admin",
        "next_path": "/",
        "app_name": "Console",
    }
    values.update(changes)
    return PageContext(**values)


def security(ctx: PageContext | None = None, **changes: Any) -> str:
    options: dict[str, Any] = {
        "privileged": True,
        "methods": METHODS,
        "settings": SETTINGS,
        "preview": PREVIEW,
        "session_lifetime": "Set by Console",
        "verify_every": "12 hours",
        "lockout": "5 failed attempts within 15 minutes pause verification for 15 minutes",
    }
    options.update(changes)
    return render_security(ctx or context(), **options)


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
        return " ".join(" ".join(self._text).split()).replace(" ,", ",").replace(" .", ".")

    def ids(self) -> set[str]:
        return {str(attrs["id"]) for _, attrs in self.elements if attrs.get("id")}

    def by_id(self, element_id: str) -> dict[str, str | None]:
        return next(attrs for _, attrs in self.elements if attrs.get("id") == element_id)

    def all(self, *tags: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.elements if name in tags]

    def main(self) -> dict[str, str | None]:
        return self.all("main")[0]

    def section(self, element_id: str) -> Page:
        match = re.search(rf'<section[^>]*id="{element_id}".*?</section>', self.markup, re.S)
        assert match, f"no section {element_id!r}"
        return Page(match.group(0))


ALL_PAGES: dict[str, Callable[[PageContext], str]] = {
    "admin": lambda ctx: security(ctx),
    "admin-config": lambda ctx: security(ctx, settings={**SETTINGS, "managed_by": "config"}),
    "admin-step-up": lambda ctx: security(
        ctx, settings=None, step_up_url=f"{ctx.prefix.rstrip('/')}/verify?next=/x"
    ),
    "member": lambda ctx: security(ctx, privileged=False, settings=None, preview=None),
    "audit": render_audit,
}


# --- who sees what ------------------------------------------------------------------------


ORG_IDS = {"policy-card", "ip-card", "policy-form", "ip-form", "settings-conflict", "open-audit"}


@pytest.mark.parametrize(
    "settings", [None, SETTINGS], ids=["no-settings", "settings-passed-by-mistake"]
)
def test_members_see_their_own_methods_only(settings: dict[str, Any] | None) -> None:
    page = Page(security(context(role="member"), privileged=False, settings=settings))

    assert {"personal-mfa", "outside-card"} <= page.ids()
    assert not ORG_IDS & page.ids()
    assert "audit" not in page.markup
    assert "10.0.0.0/8" not in page.markup
    assert "data-version" not in page.markup


def test_admins_see_the_org_cards_and_the_audit_link() -> None:
    page = Page(security())

    assert page.ids() >= ORG_IDS
    assert page.by_id("open-audit")["href"] == "/mfa/audit"
    assert "Open audit log" in page.text
    assert page.main()["data-version"] == "7"
    assert page.main()["data-managed-by"] == "store"
    checked = [r["value"] for r in page.all("input") if r.get("type") == "radio" and "checked" in r]
    assert checked == ["admins"]
    for label in (
        "Optional: members choose",
        "Admins and owners must use MFA",
        "Everyone must use MFA",
    ):
        assert label in page.text
    assert page.by_id("grace-hours")["value"] == "72"
    assert "72 hours" in page.text
    assert page.by_id("policy-preview") is not None
    assert "3 users enrolled, 2 would be in grace, 1 would be blocked" in page.text
    assert re.search(r'id="ip-allowlist"[^>]*>10\.0\.0\.0/8\n2001:db8::/32</textarea>', page.markup)
    assert re.search(r'id="ip-denylist"[^>]*>10\.9\.0\.0/16</textarea>', page.markup)


def test_the_ip_card_says_the_denylist_comes_first() -> None:
    card = Page(security()).section("ip-card")

    assert IP_ORDER_NOTE == (
        "The denylist is evaluated first; an empty allowlist means unrestricted."
    )
    assert IP_ORDER_NOTE in card.text


@pytest.mark.parametrize("managed_by", ["config", "store"])
def test_settings_managed_by_config_are_read_only(managed_by: str) -> None:
    page = Page(security(settings={**SETTINGS, "managed_by": managed_by}))
    read_only = managed_by == "config"

    for card_id in ("policy-card", "ip-card"):
        card = page.section(card_id)
        controls = card.all("input", "textarea", "button")
        assert len(controls) >= 2
        assert all(("disabled" in c) is read_only for c in controls), card_id
        assert ("security.managed_by: config" in card.text) is read_only
    assert MANAGED_BY_CONFIG_NOTE.startswith(
        "Managed by the deployment's configuration (security.managed_by: config)"
    )


def test_an_admin_without_a_recent_verification_is_asked_to_confirm_first() -> None:
    page = Page(security(settings=None, preview=None, step_up_url="/mfa/verify?next=/mfa/security"))

    assert not {"policy-card", "ip-card"} & page.ids()
    assert "confirm it's you first" in page.text
    links = [a["href"] for a in page.all("a")]
    assert "/mfa/verify?next=/mfa/security" in links
    assert page.by_id("open-audit")["href"] == "/mfa/audit"


def test_an_admin_whose_settings_did_not_load_is_told_so() -> None:
    page = Page(security(settings=None, preview=None))

    assert "couldn't be loaded" in page.text
    assert not {"policy-card", "ip-card"} & page.ids()


# --- personal methods -----------------------------------------------------------------------


def test_personal_card_lists_passkeys_with_dates_and_remove_buttons() -> None:
    page = Page(security(privileged=False))

    assert "Work laptop" in page.text
    assert "Added 1 March 2025, 12:00 UTC, last used 2 March 2025, 08:30 UTC" in page.text
    assert "Added 3 March 2025, 09:00 UTC, never used" in page.text
    removes = [b for b in page.all("button") if b.get("data-passkey-id")]
    assert [(b["data-passkey-id"], b["aria-label"]) for b in removes] == [
        ("cred-1", "Remove passkey Work laptop"),
        ("cred-2", "Remove passkey Phone"),
    ]
    assert "hidden" in page.by_id("passkey-none")
    assert page.by_id("passkey-add")["href"] == "/mfa/setup?next=%2Fmfa%2Fsecurity"
    assert "totp-remove" in page.ids()
    assert "totp-add" not in page.ids()
    assert "You have 8 recovery codes left." in page.text
    assert "recovery-regenerate" in page.ids()
    assert "hidden" in page.by_id("recovery-new")
    assert {"recovery-copy", "recovery-download", "recovery-codes"} <= page.ids()


def test_personal_card_without_methods_offers_to_add_them() -> None:
    page = Page(
        security(
            privileged=False, methods={"totp": False, "passkeys": [], "recovery_codes_left": 0}
        )
    )

    assert "hidden" not in page.by_id("passkey-none")
    assert page.by_id("totp-add")["href"] == "/mfa/setup?method=totp&next=%2Fmfa%2Fsecurity"
    assert "Off" in page.text
    assert "totp-remove" not in page.ids()
    assert "recovery-regenerate" not in page.ids()  # the API answers 409 not_enrolled
    assert "first sign-in method" in page.text


def test_few_recovery_codes_left_stand_out() -> None:
    page = Page(security(methods={**METHODS, "recovery_codes_left": 1}))

    assert "You have 1 recovery code left." in page.text
    assert "notice-warning" in str(page.by_id("recovery-left")["class"])


def test_outside_card_names_what_the_page_does_not_manage() -> None:
    card = Page(security(privileged=False)).section("outside-card")

    assert "Session lifetime and password policy are managed by" in card.text
    assert "Set by Console" in card.text
    assert "12 hours" in card.text
    assert "5 failed attempts within 15 minutes" in card.text


# --- audit page -----------------------------------------------------------------------------


def test_audit_page_has_the_table_filters_and_exports() -> None:
    page = Page(render_audit(context()))

    assert page.main()["data-page"] == "audit"
    headers = re.findall(r'<th scope="col">(.*?)</th>', page.markup)
    assert headers == [
        "Time",
        "Actor",
        "Client address",
        "Action",
        "Target",
        "Outcome",
        "Details",
    ]
    assert "newest first" in page.text
    assert page.by_id("audit-export-csv")["href"] == "/mfa/api/admin/audit?limit=1000&format=csv"
    assert page.by_id("audit-export-json")["href"] == "/mfa/api/admin/audit?limit=1000"
    assert "hidden" in page.by_id("audit-more")
    assert {"audit-action", "audit-actor", "audit-rows"} <= page.ids()
    assert next(link["href"] for link in page.all("a")) == "/mfa/security"


# --- every page -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(ALL_PAGES) - {"admin-config"}))
def test_values_are_escaped(name: str) -> None:
    evil_methods = {
        **METHODS,
        "passkeys": [{"id": '"><b>', "name": EVIL, "created_at": "<i>", "last_used_at": None}],
    }
    evil_settings = {**SETTINGS, "ip_allowlist": ["</textarea><script>alert(1)</script>"]}
    ctx = context(user=EVIL, role="<i>", app_name="<b>Console</b>", csrf_token='"><b>')
    step_up = name == "admin-step-up"
    markup = (
        render_audit(ctx)
        if name == "audit"
        else security(
            ctx,
            privileged=name != "member",
            methods=evil_methods,
            settings=None if step_up else evil_settings,
            step_up_url='/mfa/verify?next="><b>' if step_up else None,
            session_lifetime=EVIL,
        )
    )
    page = Page(markup)

    assert "<script>alert" not in markup
    assert "<i>" not in markup
    assert "<b>" not in markup
    assert EVIL in page.text
    assert page.main()["data-user"] == EVIL
    assert page.main()["data-csrf-token"] == '"><b>'


@pytest.mark.parametrize("name", sorted(ALL_PAGES))
def test_pages_are_csp_friendly_and_use_the_prefix(name: str) -> None:
    """Nothing that `default-src 'self'; img-src 'self' data:; style-src 'self'` blocks."""
    page = Page(ALL_PAGES[name](context(prefix="/_sidecar/")))

    assert [s.get("src") for s in page.all("script")] == ["/_sidecar/static/security.js"]
    assert [link["href"] for link in page.all("link")] == ["/_sidecar/static/mfa.css"]
    assert not page.all("style")
    for tag, attrs in page.elements:
        assert "style" not in attrs, f"style= on <{tag}>"
        assert not [a for a in attrs if a.startswith("on")], f"event handler on <{tag}>"
        for url_attr in ("src", "href", "action"):
            url = attrs.get(url_attr)
            assert url is None or (url.startswith("/") and not url.startswith("//")), url
    assert page.main()["data-prefix"] == "/_sidecar"
    assert "/mfa/" not in page.markup


@pytest.mark.parametrize("name", sorted(ALL_PAGES))
def test_every_form_control_has_a_label(name: str) -> None:
    page = Page(ALL_PAGES[name](context()))
    labels = {attrs.get("for") for attrs in page.all("label")}

    controls = page.all("input", "textarea", "select")
    assert controls or name.startswith(("member", "admin-step-up"))
    for control in controls:
        assert control.get("id") in labels, control
    for text in re.findall(r"<label[^>]*>(.*?)</label>", page.markup, re.S):
        assert text.strip()


def test_each_textarea_has_its_own_label_and_error_list() -> None:
    page = Page(security())

    for area_id, label in (("ip-allowlist", "Allowlist"), ("ip-denylist", "Denylist")):
        assert re.search(rf'<label for="{area_id}">{label}</label>', page.markup)
        described = str(page.by_id(area_id)["aria-describedby"]).split()
        assert f"{area_id}-errors" in described
        assert "hidden" in page.by_id(f"{area_id}-errors")


def test_every_element_the_script_looks_up_exists_on_a_page() -> None:
    script = (STATIC_DIR / "security.js").read_text()
    wanted = set(re.findall(r"""byId\(["']([\w-]+)["']\)""", script))
    wanted |= {f"{area}-errors" for area in ("ip-allowlist", "ip-denylist")}
    rendered = Page(security()).ids() | Page(render_audit(context())).ids()

    assert len(wanted) > 20, "the regex no longer finds lookups"
    assert wanted - rendered == set()


# --- helpers and assets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (12 * 3600, "12 hours"),
        (72 * 3600, "72 hours"),
        (3600, "1 hour"),
        (15 * 60, "15 minutes"),
        (90 * 60, "90 minutes"),
        (7 * 86400, "7 days"),
        (1, "1 second"),
        (45, "45 seconds"),
        (1.5, "1.5 seconds"),
    ],
    ids=str,
)
def test_durations_read_naturally(seconds: float, expected: str) -> None:
    assert describe_duration(seconds) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(72 * 3600, "72 hours"), (3600, "1 hour"), (5400, "1.5 hours"), (0, "no grace period")],
    ids=str,
)
def test_grace_periods_are_told_in_hours(seconds: float, expected: str) -> None:
    assert describe_grace(seconds) == expected


def test_lockout_and_preview_sentences() -> None:
    assert describe_lockout(1, 60, 3600) == (
        "1 failed attempt within 1 minute pause verification for 1 hour (per user and per address)"
    )
    assert preview_text({"enrolled": 1, "grace": 0, "blocked": 4}) == (
        "1 user enrolled, 0 would be in grace, 4 would be blocked"
    )


def test_static_file_serves_security_js() -> None:
    assert static_file("security.js") == (STATIC_DIR / "security.js").read_bytes()
    assert pages.STATIC_FILES["security.js"].startswith("text/javascript")
    assert static_file("../security.js") is None


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
def test_script_parses() -> None:
    node = shutil.which("node")
    assert node
    result = subprocess.run(
        [node, "--check", str(STATIC_DIR / "security.js")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- in a real browser ----------------------------------------------------------------------

Answer = tuple[int, dict[str, Any]]


@dataclass
class StubApi(PageServing):
    """The admin and personal JSON API, scripted: ``answers["PUT admin/security"]`` holds the
    answers to give, in order; with none left, a plausible success."""

    answers: dict[str, list[Answer]] = field(default_factory=dict)
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)

    def app(self, routes: dict[str, Callable[[], str]]) -> web.Application:
        app = web.Application(middlewares=[self.csp])
        for path, make in routes.items():
            app.router.add_get(path, self.page(make))
        app.router.add_get("/mfa/static/{name}", self.static)
        app.router.add_get("/mfa/verify", self.page(lambda: "<!doctype html><title>v</title>"))
        app.router.add_get("/favicon.ico", self.page(lambda: ""))
        app.router.add_route("*", "/mfa/api/{path:.+}", self.api)
        return app

    async def api(self, request: web.Request) -> web.Response:
        key = f"{request.method} {request.match_info['path']}"
        body: Any = await request.json() if request.can_read_body else None
        self.calls.append((key, request.query_string, body))
        if request.headers.get("X-CSRF-Token") != "csrf-token-123":
            return web.json_response({"error": "csrf", "message": "bad token"}, status=403)
        if scripted := self.answers.get(key):
            status, data = scripted.pop(0)
            return web.json_response(data, status=status)
        if key == "GET admin/audit":
            return web.json_response({"entries": self.audit_page(request.query)})
        if key == "PUT admin/security":
            saved = {**SETTINGS, **body, "version": body["version"] + 1}
            for name in ("ip_allowlist", "ip_denylist"):
                if isinstance(saved[name], str):
                    saved[name] = [line.strip() for line in saved[name].splitlines() if line]
            return web.json_response(saved)
        return web.json_response({})

    def audit_page(self, query: Any) -> list[dict[str, Any]]:
        rows = [r for r in self.audit if not query.get("action") or r["action"] == query["action"]]
        if "before" in query:
            rows = [r for r in rows if r["seq"] < int(query["before"])]
        return rows[: int(query.get("limit", 100))]


def audit_entry(seq: int, **changes: Any) -> dict[str, Any]:
    entry = {
        "seq": seq,
        "time": f"2025-03-01T12:{seq % 60:02d}:00+00:00",
        "actor": "alice",
        "client_ip": "203.0.113.7",
        "action": "mfa.verify" if seq % 2 else "ip.blocked",
        "target": None,
        "outcome": "success" if seq % 2 else "denied_ip",
        "details": {"method": "totp"},
        "hash": "h",
    }
    entry.update(changes)
    return entry


@dataclass
class Browser:
    page: Any  # playwright.async_api.Page
    base: str
    problems: list[str]

    async def open(self, path: str) -> None:
        await self.page.goto(self.base + path)
        await self.page.wait_for_load_state("load")

    async def status(self, kind: str | None = None) -> str:
        # Locator waits, not wait_for_function: the page's CSP forbids the eval that needs.
        if kind:
            await self.page.locator(f"#mfa-status[data-kind='{kind}']").wait_for()
        text: str = await self.page.locator("#mfa-status").inner_text()
        return text


OpenBrowser = Callable[[StubApi, dict[str, Callable[[], str]]], Awaitable[Browser]]


@pytest.fixture
def chromium_available() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (CI provides Debian Chromium)")
    pytest.importorskip("playwright.async_api", reason="playwright is not installed")


@pytest.fixture
async def open_browser(
    chromium_available: None, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> AsyncIterator[OpenBrowser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )

        async def factory(stub: StubApi, routes: dict[str, Callable[[], str]]) -> Browser:
            server = await aiohttp_server(stub.app(routes))
            base = f"http://localhost:{server.port}"
            browser_context = await chromium.new_context(base_url=base)
            page = await browser_context.new_page()
            page.set_default_timeout(10_000)
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("dialog", lambda dialog: dialog.accept())
            return Browser(page=page, base=base, problems=problems)

        try:
            yield factory
        finally:
            await chromium.close()


def security_routes(**changes: Any) -> dict[str, Callable[[], str]]:
    return {
        "/mfa/security": lambda: security(**changes),
        "/mfa/audit": lambda: render_audit(context()),
    }


@pytest.mark.browser
async def test_browser_ip_lists_show_errors_per_line_then_confirm_a_lockout(
    open_browser: OpenBrowser,
) -> None:
    errors = [
        {"field": "ip_denylist", "line": 2, "value": "10.0.0.0/33", "reason": "is not a CIDR"},
        {"field": "ip_denylist", "line": 4, "value": "nope", "reason": "is not a CIDR"},
    ]
    lockout = (
        "This change would block your current address 127.0.0.1 (denylist 127.0.0.0/8)."
        " Send confirm_lockout: true to apply it anyway."
    )
    stub = StubApi(
        answers={
            "PUT admin/security": [
                (400, {"error": "invalid", "message": "2 value(s) need fixing.", "errors": errors}),
                (409, {"error": "would_lock_you_out", "message": lockout}),
            ]
        }
    )
    browser = await open_browser(stub, security_routes())
    page = browser.page
    await browser.open("/mfa/security")

    deny = page.get_by_label("Denylist")
    await deny.fill("10.9.0.0/16\n10.0.0.0/33\n\nnope")
    await page.get_by_role("button", name="Save IP restrictions").click()
    assert "2 value(s) need fixing." in await browser.status("error")
    assert await page.locator("#ip-denylist-errors li").all_inner_texts() == [
        "line 2: 10.0.0.0/33 — is not a CIDR",
        "line 4: nope — is not a CIDR",
    ]
    assert await deny.get_attribute("aria-invalid") == "true"
    assert await page.get_by_label("Allowlist").get_attribute("aria-invalid") is None
    assert not await page.locator("#ip-allowlist-errors").is_visible()
    assert stub.calls[0][2]["ip_denylist"] == "10.9.0.0/16\n10.0.0.0/33\n\nnope"
    assert stub.calls[0][2]["version"] == 7

    await deny.fill("127.0.0.0/8")
    await page.get_by_role("button", name="Save IP restrictions").click()
    await page.locator("#ip-lockout").wait_for()
    text = await page.locator("#ip-lockout-text").inner_text()
    assert "would block your current address 127.0.0.1" in text
    assert "confirm_lockout" not in text
    assert "confirm_lockout" not in stub.calls[1][2]
    assert await deny.get_attribute("aria-invalid") is None  # the old line errors are gone

    await page.get_by_role("button", name="Save anyway").click()
    assert await browser.status("ok") == "IP restrictions saved."
    assert stub.calls[2][2]["confirm_lockout"] is True
    assert stub.calls[2][2]["version"] == 7
    assert not await page.locator("#ip-lockout").is_visible()
    assert browser.problems == []


@pytest.mark.browser
async def test_browser_policy_preview_follows_the_selection_and_save_handles_a_conflict(
    open_browser: OpenBrowser,
) -> None:
    conflict = "Someone else changed these settings since you loaded them. Reload and retry."
    stub = StubApi(
        answers={
            "GET admin/security/preview": [
                (200, {"users": 9, "enrolled": 1, "grace": 8, "blocked": 0}),
                (200, {"users": 9, "enrolled": 1, "grace": 0, "blocked": 8}),
            ],
            "PUT admin/security": [
                (200, {**SETTINGS, "mfa_policy": "all", "version": 8}),
                (409, {"error": "conflict", "message": conflict}),
            ],
        }
    )
    browser = await open_browser(stub, security_routes())
    page = browser.page
    await browser.open("/mfa/security")
    preview = page.locator("#policy-preview")

    await page.get_by_label("Everyone must use MFA").check()
    await page.locator("#policy-preview", has_text="8 would be in grace").wait_for()
    assert await preview.inner_text() == "1 user enrolled, 8 would be in grace, 0 would be blocked"
    await page.get_by_label("Grace period in hours").fill("0")
    await page.locator("#policy-preview", has_text="8 would be blocked").wait_for()
    previews = [c[1] for c in stub.calls if c[0] == "GET admin/security/preview"]
    assert previews == ["mfa_policy=all&grace_period=259200", "mfa_policy=all&grace_period=0"]

    await page.get_by_role("button", name="Save policy").click()
    assert await browser.status("ok") == "MFA policy saved."
    saves = [c[2] for c in stub.calls if c[0] == "PUT admin/security"]
    assert saves == [{"mfa_policy": "all", "grace_period_seconds": 0, "version": 7}]

    await page.get_by_role("button", name="Save policy").click()
    await page.locator("#settings-conflict").wait_for()
    assert conflict in await page.locator("#settings-conflict").inner_text()
    assert await page.get_by_role("link", name="Reload the page").get_attribute("href") == (
        "/mfa/security"
    )
    saves = [c[2] for c in stub.calls if c[0] == "PUT admin/security"]
    assert saves[1]["version"] == 8  # the version the first save returned
    assert browser.problems == []


@pytest.mark.browser
async def test_browser_removing_the_last_passkey_asks_again_and_step_up_redirects(
    open_browser: OpenBrowser,
) -> None:
    last = "This is your last sign-in method; removing it turns MFA off for you."
    stub = StubApi(
        answers={
            "DELETE passkeys/cred-1": [(409, {"error": "confirm_required", "message": last})],
            "DELETE totp": [
                (
                    403,
                    {
                        "error": "step_up_required",
                        "message": "Confirm it's you again.",
                        "location": "/mfa/verify?next=/mfa/security",
                    },
                )
            ],
        }
    )
    browser = await open_browser(stub, security_routes(privileged=False))
    page = browser.page
    await browser.open("/mfa/security")

    await page.get_by_role("button", name="Remove passkey Work laptop").click()
    await page.locator("#mfa-status", has_text="removed").wait_for()
    assert await browser.status() == "Passkey “Work laptop” removed."  # after the reload
    deletes = [(c[0], c[1]) for c in stub.calls if c[0].startswith("DELETE")]
    assert deletes == [("DELETE passkeys/cred-1", ""), ("DELETE passkeys/cred-1", "confirm=true")]

    await page.get_by_role("button", name="Remove authenticator app").click()
    await page.wait_for_url(re.compile(r"/mfa/verify\?next=/mfa/security$"))
    assert browser.problems == []


@pytest.mark.browser
async def test_browser_regenerated_recovery_codes_are_shown_once(
    open_browser: OpenBrowser,
) -> None:
    codes = [f"BBBBB-{n:05d}" for n in range(10)]
    stub = StubApi(answers={"POST recovery-codes/regenerate": [(200, {"recovery_codes": codes})]})
    browser = await open_browser(stub, security_routes())
    page = browser.page
    await browser.open("/mfa/security")

    await page.get_by_role("button", name="Regenerate recovery codes").click()
    await page.locator("#recovery-new").wait_for()
    assert await page.locator("#recovery-codes li").all_inner_texts() == codes
    assert "You have 10 recovery codes left." in await page.locator("#recovery-left").inner_text()
    assert "won't be shown again" in await browser.status("ok")
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download").click()
    assert (await download_info.value).suggested_filename == "recovery-codes.txt"
    assert browser.problems == []


@pytest.mark.browser
async def test_browser_audit_table_pages_filters_and_keeps_text_as_text(
    open_browser: OpenBrowser,
) -> None:
    from playwright.async_api import expect

    stub = StubApi(audit=[audit_entry(seq) for seq in range(70, 0, -1)])
    stub.audit[0]["details"] = {"name": "<img src=x>"}
    browser = await open_browser(stub, security_routes())
    page = browser.page
    await browser.open("/mfa/audit")
    rows = page.locator("#audit-rows tr")

    await expect(rows).to_have_count(50)
    first = await rows.nth(0).locator("td").all_inner_texts()
    assert first == [
        "2025-03-01 12:10:00 UTC",
        "alice",
        "203.0.113.7",
        "ip.blocked",
        "",
        "denied_ip",
        "name: <img src=x>",
    ]
    assert await page.locator("#audit-rows img").count() == 0
    await page.get_by_role("button", name="Load more").click()
    await expect(rows).to_have_count(70)
    assert not await page.get_by_role("button", name="Load more").is_visible()
    assert "before=21" in [c[1] for c in stub.calls if c[0] == "GET admin/audit"][-1]

    await page.get_by_label("Action").fill("mfa.verify")
    await page.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_count(35)
    assert page.url.endswith("/mfa/audit?action=mfa.verify")
    assert await page.get_by_role("link", name="Export CSV").get_attribute("href") == (
        "/mfa/api/admin/audit?action=mfa.verify&limit=1000&format=csv"
    )
    assert await page.get_by_role("link", name="Export JSON").get_attribute("href") == (
        "/mfa/api/admin/audit?action=mfa.verify&limit=1000"
    )

    await page.get_by_label("Action").fill("nothing.matches")
    await page.get_by_role("button", name="Filter").click()
    await page.locator("#audit-empty").wait_for()
    assert browser.problems == []
