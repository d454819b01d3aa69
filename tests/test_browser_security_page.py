"""End to end in a real browser: the Security and Audit pages (issue #6).

The demo console behind the real sidecar (org policy ``optional``, no grace period), Debian
Chromium clicking through the sidecar's own pages against its real admin API:

1. Bob (admin) logs in, enrolls a passkey (CDP virtual authenticator) from the setup page
   and lands on ``/mfa/security``: his methods, the MFA policy card, the IP restrictions card
   and "Open audit log".
2. He picks "Everyone must use MFA" (the preview sentence follows) and saves; types a
   denylist with a bad second line, sees the error under it, fixes it and saves; adds his own
   address and gets the "would lock you out" notice, which he does not confirm.
3. Carol (member), in a fresh browser, is now sent to the setup page after logging in.
4. The audit log lists bob's ``security.settings.changed`` records newest first; the action
   filter narrows the table to them.
5. Carol's Security page has only her own methods; the audit log refuses her.

Screenshots of each state go to ``test-artifacts/security-page/`` (gitignored).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Stack,
    Tab,
    console_login,
    open_tab,
    running_stack,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"
    ),
    pytest.mark.asyncio(loop_scope="module"),
]

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "security-page"
WANTED = "/reports?team=ops"  # the console page carol asks for
SETUP_URL = re.compile(r"/mfa/setup\?next=")
SECURITY_URL = re.compile(r"/mfa/security$")
#: Where the browser connects from (the sidecar listens on 127.0.0.1 only).
OWN_ADDRESS = "127.0.0.1"
GOOD_DENYLIST = "198.51.100.0/24\n10.0.0.0/24"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    # Policy optional and no grace period, so a policy tightened on the Security page
    # applies at once (it starts a new epoch).
    async with running_stack(
        tmp_path, security={"mfa_policy": "optional", "grace_period": "0s"}
    ) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def tabs(browser: Browser) -> AsyncIterator[list[Tab]]:
    """Tabs opened by a test; closed afterwards, and checked for uncaught page errors."""
    opened: list[Tab] = []
    yield opened
    for tab in opened:
        await tab.context.close()
    errors = [e for tab in opened for e in tab.page_errors]
    assert not errors, f"uncaught errors in the pages: {errors}"


async def new_tab(browser: Browser, stack: Stack, tabs: list[Tab]) -> Tab:
    tab = await open_tab(browser, stack)
    tabs.append(tab)
    return tab


async def shot(page: Page, name: str, *, full_page: bool = True) -> None:
    """Save a screenshot. ``full_page=False`` for states told by the sticky status line (a
    full-page capture draws it over the page at the scroll position)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


# --- steps -------------------------------------------------------------------------------------


async def admin_enrolls_and_opens_security(tab: Tab) -> None:
    """Bob logs in (policy optional: not forced), adds a passkey, lands on the Security page."""
    page = tab.page
    await tab.add_authenticator()
    await console_login(tab, "bob", "/")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Dashboard")
    await page.goto("/mfa/setup?next=/mfa/security")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Set up passkey MFA")
    await page.get_by_label("Name for this passkey").fill("Bob's laptop")
    await page.get_by_role("button", name="Create passkey").click()
    await expect(page.locator("#recovery-step")).to_be_visible()
    await page.get_by_label("I saved my recovery codes").check()
    await page.get_by_role("button", name="Continue").click()
    await page.wait_for_url(SECURITY_URL)

    await expect(page.get_by_role("heading", level=1)).to_have_text("Security")
    await expect(page.get_by_text("Signed in as")).to_contain_text("bob@example.com (admin)")
    await expect(page.get_by_role("heading", name="Your sign-in methods")).to_be_visible()
    await expect(page.locator("#passkey-list")).to_contain_text("Bob's laptop")
    await expect(page.locator("#recovery-left")).to_contain_text("10 recovery codes left")
    await expect(page.get_by_role("heading", name="Organization MFA policy")).to_be_visible()
    await expect(page.get_by_role("heading", name="IP restrictions")).to_be_visible()
    await expect(page.get_by_role("link", name="Open audit log")).to_be_visible()
    await expect(page.locator("#org-step-up")).to_have_count(0)
    await shot(page, "01-admin-security-page")


async def admin_requires_mfa_for_everyone(tab: Tab) -> None:
    """The preview follows the selection (carol would be blocked: no grace), then the save."""
    page = tab.page
    preview = page.locator("#policy-preview")
    await expect(page.get_by_label("Optional: members choose")).to_be_checked()
    await expect(page.get_by_label("Grace period in hours")).to_have_value("0")
    await expect(preview).to_have_text("1 user enrolled, 0 would be in grace, 0 would be blocked")
    await page.get_by_label("Everyone must use MFA").check()
    await expect(preview).to_have_text("1 user enrolled, 0 would be in grace, 1 would be blocked")
    await page.locator("#policy-card").scroll_into_view_if_needed()
    await shot(page, "02-policy-all-preview", full_page=False)

    await page.get_by_role("button", name="Save policy").click()
    status = page.locator("#mfa-status")
    await expect(status).to_have_text("MFA policy saved.")
    await expect(status).to_have_attribute("data-kind", "ok")
    await expect(page.locator("#grace-current")).to_have_text("no grace period")
    await shot(page, "03-policy-saved", full_page=False)


async def admin_saves_the_denylist(tab: Tab) -> None:
    """A bad second line is named under the denylist; once fixed, the lists save."""
    page = tab.page
    denylist = page.get_by_label("Denylist")
    errors = page.locator("#ip-denylist-errors")
    status = page.locator("#mfa-status")
    await denylist.fill("198.51.100.0/24\n10.0.0.0/33")
    await page.get_by_role("button", name="Save IP restrictions").click()
    await expect(errors).to_be_visible()
    await expect(errors.locator("li")).to_have_text(["line 2: 10.0.0.0/33 — is not a CIDR"])
    await expect(denylist).to_have_attribute("aria-invalid", "true")
    await expect(denylist).to_be_focused()
    await expect(status).to_have_attribute("data-kind", "error")
    await expect(status).to_have_text("1 value(s) need fixing.")
    await expect(page.locator("#ip-allowlist-errors")).to_be_hidden()
    await page.locator("#ip-card").scroll_into_view_if_needed()
    await shot(page, "04-denylist-line-2-invalid", full_page=False)

    await denylist.fill("198.51.100.0/24\n10.0.0.0/24")
    await page.get_by_role("button", name="Save IP restrictions").click()
    await expect(status).to_have_text("IP restrictions saved.")
    await expect(status).to_have_attribute("data-kind", "ok")
    await expect(errors).to_be_hidden()
    await expect(denylist).not_to_have_attribute("aria-invalid", "true")
    await expect(denylist).to_have_value(GOOD_DENYLIST)
    await shot(page, "05-denylist-saved", full_page=False)


async def admin_is_warned_before_locking_himself_out(tab: Tab) -> None:
    """Denylisting his own address is refused with a notice; he doesn't save anyway."""
    page = tab.page
    denylist = page.get_by_label("Denylist")
    notice = page.locator("#ip-lockout")
    await expect(notice).to_be_hidden()
    await denylist.fill(f"{GOOD_DENYLIST}\n{OWN_ADDRESS}")
    await page.get_by_role("button", name="Save IP restrictions").click()
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text(f"would block your current address {OWN_ADDRESS}")
    await expect(notice).to_contain_text("you lose access from where you are now")
    await expect(notice).not_to_contain_text("confirm_lockout")
    await expect(page.locator("#mfa-status")).to_have_text(
        "Not saved: this change would lock you out."
    )
    await expect(page.get_by_role("button", name="Save anyway")).to_be_focused()
    await page.locator("#ip-card").scroll_into_view_if_needed()
    await shot(page, "06-would-lock-you-out", full_page=False)

    # Not confirmed: after a reload the saved lists are still the earlier ones.
    await page.reload()
    await expect(page.get_by_label("Denylist")).to_have_value(GOOD_DENYLIST)
    await expect(page.get_by_label("Everyone must use MFA")).to_be_checked()
    await expect(page.locator("#ip-lockout")).to_be_hidden()
    # And he still gets through to the console from here.
    await page.goto("/")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Dashboard")
    await page.goto("/mfa/security")


async def member_is_sent_to_setup(tab: Tab) -> None:
    """Policy ``all`` without grace: carol's next login ends on the setup page, blocked."""
    page = tab.page
    await console_login(tab, "carol", WANTED)
    await page.wait_for_url(SETUP_URL)
    assert tab.next_param() == WANTED, page.url
    await expect(page.get_by_role("heading", level=1)).to_have_text("Set up passkey MFA")
    await expect(page.get_by_text("Your organization requires MFA")).to_contain_text(
        "is blocked until you set it up"
    )
    await expect(page.locator("#setup-footer")).to_have_count(0)  # no "Not now"
    await shot(page, "07-member-sent-to-setup")


async def admin_reads_the_audit_log(tab: Tab) -> None:
    page = tab.page
    await page.set_viewport_size({"width": 1400, "height": 900})  # the table's full width
    await page.get_by_role("link", name="Open audit log").click()
    await page.wait_for_url(re.compile(r"/mfa/audit$"))
    await expect(page.get_by_role("heading", level=1)).to_have_text("Audit log")
    rows = page.locator("#audit-rows tr")
    action_cells = page.locator("#audit-rows tr td:nth-child(4)")
    await expect(rows.first).to_be_visible()
    # Everything, newest first: bob's two changes on top, his enrollment below them; the
    # save the lock-out guard refused (before he confirmed it) is on record too.
    actions = await action_cells.all_inner_texts()
    changes = [a for a in actions if a != "admin.refused"]
    assert changes[:2] == ["security.settings.changed"] * 2, actions
    assert "mfa.enrolled" in changes[2:], actions
    assert "admin.refused" in actions[: actions.index("mfa.enrolled")], actions
    await shot(page, "08-audit-log")

    await page.get_by_label("Action").fill("security.settings.changed")
    # The store was seeded from the YAML at start (actor "config"): bob's own changes only.
    await page.get_by_label("Actor").fill("u-bob")
    await page.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_count(2)
    await expect(action_cells).to_have_text(["security.settings.changed"] * 2)
    await expect(page.locator("#audit-rows tr td:nth-child(2)")).to_have_text(["u-bob"] * 2)
    await expect(page.locator("#audit-rows tr td:nth-child(3)")).to_have_text([OWN_ADDRESS] * 2)
    details = page.locator("#audit-rows tr td.details")
    await expect(details.nth(0)).to_contain_text("ip_denylist")
    await expect(details.nth(0)).to_contain_text("version: 3")
    await expect(details.nth(1)).to_contain_text('"mfa_policy":{"new":"all","old":"optional"}')
    await expect(details.nth(1)).to_contain_text("version: 2")
    await expect(page).to_have_url(re.compile(r"\?action=security\.settings\.changed&actor=u-bob$"))
    await expect(page.locator("#audit-export-csv")).to_have_attribute(
        "href", re.compile(r"action=security\.settings\.changed")
    )
    await shot(page, "09-audit-log-filtered")

    # A filter nothing matches: an empty table says so.
    await page.get_by_label("Action").fill("mfa.reset")
    await page.get_by_role("button", name="Filter").click()
    await expect(rows).to_have_count(0)
    await expect(page.locator("#audit-empty")).to_be_visible()


async def member_sees_only_her_methods(tab: Tab) -> None:
    page = tab.page
    await page.goto("/mfa/security")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Security")
    await expect(page.get_by_text("Signed in as")).to_contain_text("carol@example.com (member)")
    await expect(page.get_by_role("heading", name="Your sign-in methods")).to_be_visible()
    await expect(page.locator("#passkey-none")).to_be_visible()
    for hidden in ("#policy-card", "#ip-card", "#org-step-up", "#org-unavailable", "#open-audit"):
        await expect(page.locator(hidden)).to_have_count(0)
    await expect(page.get_by_text("Organization MFA policy")).to_have_count(0)
    await expect(page.get_by_role("link", name="Open audit log")).to_have_count(0)
    await shot(page, "10-member-security-page")

    answer = await page.goto("/mfa/audit")
    assert answer is not None
    assert answer.status == 403
    await expect(page.get_by_role("heading", level=1)).to_have_text("Admins only")
    await expect(page.locator("#audit-table")).to_have_count(0)
    await shot(page, "11-member-audit-refused")
    # The API behind the page refuses her too (same cookies as the page).
    for path in ("/mfa/api/admin/audit", "/mfa/api/admin/security"):
        refused = await tab.context.request.get(path)
        assert refused.status == 403, (path, refused.status)
        assert (await refused.json())["error"] == "forbidden", path


# --- the story ---------------------------------------------------------------------------------


async def test_admin_changes_org_security_and_it_is_enforced_and_audited(
    browser: Browser, stack: Stack, tabs: list[Tab]
) -> None:
    # Carol logs in once under policy "optional": she reaches the console, and the sidecar
    # now knows her (the preview counts her).
    before = await new_tab(browser, stack, tabs)
    await console_login(before, "carol", WANTED)
    await before.page.wait_for_url(re.compile(re.escape(WANTED) + "$"))
    await expect(before.page.get_by_role("heading", level=1)).to_have_text("Reports")
    await before.context.close()
    tabs.remove(before)
    assert not before.page_errors, before.page_errors

    bob = await new_tab(browser, stack, tabs)
    await admin_enrolls_and_opens_security(bob)
    await admin_requires_mfa_for_everyone(bob)
    await admin_saves_the_denylist(bob)
    await admin_is_warned_before_locking_himself_out(bob)

    carol = await new_tab(browser, stack, tabs)  # a fresh browser: no cookies
    await member_is_sent_to_setup(carol)

    await admin_reads_the_audit_log(bob)
    # The API's deliberate 400 (bad line) and 409 (lockout) are the only console errors.
    assert not bob.console_errors_except_4xx(), bob.console_errors

    await member_sees_only_her_methods(carol)
    assert not carol.console_errors_except_4xx(), carol.console_errors
