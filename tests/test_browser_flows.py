"""End to end in a real browser: the demo console behind the sidecar (policy ``all``, no grace),
Debian Chromium clicking through the sidecar's setup and verify pages.

- A member enrolls a passkey (CDP virtual authenticator), saves the recovery codes and lands
  on the console page she first asked for.
- In a fresh browser (no cookies) the same passkey confirms it's her; both also with the
  WebAuthn JSON helpers removed, so mfa.js's own encoder runs (browsers without them).
- Without the passkey, a recovery code gets her in, once.
- Without a usable passkey (the ceremony is refused, or the browser has no WebAuthn) the page
  offers the authenticator app; a pyotp code computed from the secret on the page enrolls it.
- A wrong authenticator code shows an error and the user can try again, on the setup page and
  on the verify page.

Screenshots of each state go to ``test-artifacts/browser-flows/`` (gitignored).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pyotp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright, expect

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

WANTED = "/reports?team=ops"  # the console page carol asks for first
SETUP_URL = re.compile(r"/mfa/setup\?next=")
VERIFY_URL = re.compile(r"/mfa/verify\?next=")


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
    async with running_stack(tmp_path) as running:
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


async def new_tab(
    browser: Browser, stack: Stack, tabs: list[Tab], *, init_script: str | None = None
) -> Tab:
    tab = await open_tab(browser, stack, init_script=init_script)
    tabs.append(tab)
    return tab


async def reached_console(tab: Tab, shot: str | None) -> None:
    """The console page carol first asked for, as carol, through the sidecar."""
    page = tab.page
    await page.wait_for_url(re.compile(re.escape(WANTED) + "$"))
    await expect(page.get_by_role("heading", level=1)).to_have_text("Reports")
    await expect(page.get_by_role("navigation", name="Main")).to_contain_text(
        "Carol Member (member)"
    )
    if shot:
        await tab.shot(shot)


async def save_recovery_codes(tab: Tab, shot: str | None) -> list[str]:
    """The recovery-codes step: 10 codes, Continue only once "I saved..." is ticked."""
    page = tab.page
    step = page.locator("#recovery-step")
    await expect(step).to_be_visible()
    await expect(step.get_by_role("heading")).to_have_text("Save your recovery codes")
    codes = await page.locator("#recovery-codes li").all_inner_texts()
    assert len(codes) == 10, codes
    assert len(set(codes)) == 10, codes
    await expect(page.locator("#passkey-section")).to_be_hidden()
    await expect(page.locator("#totp-section")).to_be_hidden()
    if shot:
        await tab.shot(shot)
    proceed = page.get_by_role("button", name="Continue")
    await expect(proceed).to_be_disabled()
    await page.get_by_label("I saved my recovery codes").check()
    await expect(proceed).to_be_enabled()
    await proceed.click()
    return codes


async def enroll_passkey(tab: Tab, *, shots: bool) -> list[str]:
    """Log carol in, get sent to setup, create a passkey, save the codes, reach the console."""
    page = tab.page
    await console_login(tab, "carol", WANTED)
    await page.wait_for_url(SETUP_URL)
    assert tab.next_param() == WANTED, page.url
    await expect(page.get_by_role("heading", level=1)).to_have_text("Set up passkey MFA")
    await expect(page.get_by_text("Signed in as")).to_contain_text("carol@example.com")
    await expect(page.locator("#totp-section")).to_be_hidden()
    if shots:
        await tab.shot("01-setup")
    await page.get_by_label("Name for this passkey").fill("Test laptop")
    await page.get_by_role("button", name="Create passkey").click()
    codes = await save_recovery_codes(tab, "02-passkey-created-recovery-codes" if shots else None)
    await reached_console(tab, "03-console-after-passkey-setup" if shots else None)
    return codes


def wrong_code(secret: str) -> str:
    """A 6-digit code that no time step near now accepts."""
    totp = pyotp.TOTP(secret)
    near = {totp.at(time.time() + 30 * k) for k in range(-2, 3)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in near)


async def show_totp_secret(tab: Tab) -> str:
    page = tab.page
    await page.get_by_role("button", name="Show QR code").click()
    await expect(page.locator("#totp-qr svg")).to_be_visible()
    shown = await page.locator("#totp-secret").inner_text()
    secret = shown.replace(" ", "")
    assert re.fullmatch(r"[A-Z2-7]{16,}", secret), shown
    return secret


async def enter_totp(tab: Tab, code: str) -> None:
    page = tab.page
    await page.get_by_label("6-digit code from the app").fill(code)
    await page.get_by_role("button", name=re.compile(r"Verify and turn\s+on")).click()


# --- passkeys ----------------------------------------------------------------------------------


# Browsers without the WebAuthn JSON helpers (Safari < 18.4, older Firefox): mfa.js then
# encodes and decodes the binary fields itself.
NO_JSON_HELPERS = """
delete PublicKeyCredential.parseCreationOptionsFromJSON;
delete PublicKeyCredential.parseRequestOptionsFromJSON;
delete PublicKeyCredential.prototype.toJSON;
"""


@pytest.mark.parametrize("json_helpers", ["native", "fallback"])
async def test_member_enrolls_a_passkey_and_lands_on_the_page_she_asked_for(
    browser: Browser, stack: Stack, tabs: list[Tab], json_helpers: str
) -> None:
    fallback = json_helpers == "fallback"
    tab = await new_tab(browser, stack, tabs, init_script=NO_JSON_HELPERS if fallback else None)
    await tab.add_authenticator()
    await enroll_passkey(tab, shots=not fallback)
    stored = await tab.credentials()
    assert len(stored) == 1
    assert stored[0]["rpId"] == "localhost"
    assert stored[0]["isResidentCredential"] is True
    assert not tab.unexpected_console_errors(), tab.console_errors


@pytest.mark.parametrize("json_helpers", ["native", "fallback"])
async def test_passkey_from_setup_verifies_in_a_fresh_browser(
    browser: Browser, stack: Stack, tabs: list[Tab], json_helpers: str
) -> None:
    fallback = json_helpers == "fallback"
    first = await new_tab(browser, stack, tabs)
    await first.add_authenticator()
    await enroll_passkey(first, shots=False)
    [credential] = await first.credentials()

    # Another browser: no sidecar cookie, no console cookie. Same passkey (copied over).
    second = await new_tab(browser, stack, tabs, init_script=NO_JSON_HELPERS if fallback else None)
    await second.add_authenticator()
    await second.import_credential(credential)
    page = second.page
    await console_login(second, "carol", WANTED)
    await page.wait_for_url(VERIFY_URL)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Confirm it's you")
    button = page.get_by_role("button", name="Use passkey")
    await expect(button).to_be_visible()
    if not fallback:
        await second.shot("04-verify")
    await button.click()
    await reached_console(second, None if fallback else "05-console-after-passkey-verify")
    [after] = await second.credentials()
    assert after["signCount"] > credential["signCount"]
    assert not second.unexpected_console_errors(), second.console_errors


async def test_recovery_code_verifies_when_the_passkey_is_lost(
    browser: Browser, stack: Stack, tabs: list[Tab]
) -> None:
    first = await new_tab(browser, stack, tabs)
    await first.add_authenticator()
    codes = await enroll_passkey(first, shots=False)

    # A new laptop without the passkey: a recovery code gets carol in, once.
    second = await new_tab(browser, stack, tabs)
    page = second.page
    await console_login(second, "carol", WANTED)
    await page.wait_for_url(VERIFY_URL)
    await page.get_by_text("Use a recovery code").click()
    await page.get_by_label("Recovery code").fill(codes[3].lower())
    await second.shot("13-verify-recovery-code")
    await page.get_by_role("button", name="Use recovery code").click()
    await reached_console(second, None)

    # The same code again, from a third browser: refused, the form stays usable.
    third = await new_tab(browser, stack, tabs)
    page = third.page
    await console_login(third, "carol", WANTED)
    await page.wait_for_url(VERIFY_URL)
    await page.get_by_text("Use a recovery code").click()
    await page.get_by_label("Recovery code").fill(codes[3])
    await page.get_by_role("button", name="Use recovery code").click()
    await expect(page.locator("#mfa-status")).to_have_attribute("data-kind", "error")
    await expect(page).to_have_url(VERIFY_URL)
    await expect(page.get_by_label("Recovery code")).to_have_attribute("aria-invalid", "true")
    await page.get_by_label("Recovery code").fill(codes[4])
    await page.get_by_role("button", name="Use recovery code").click()
    await reached_console(third, None)
    assert not third.console_errors_except_4xx(), third.console_errors


# --- authenticator app when passkeys don't work ------------------------------------------------

# The page's script sees no WebAuthn at all (an old or locked-down browser).
NO_WEBAUTHN = "delete window.PublicKeyCredential;"


@pytest.mark.parametrize("why", ["passkey-refused", "no-webauthn"])
async def test_authenticator_app_when_passkeys_are_unavailable(
    browser: Browser, stack: Stack, tabs: list[Tab], why: str
) -> None:
    tab = await new_tab(
        browser, stack, tabs, init_script=NO_WEBAUTHN if why == "no-webauthn" else None
    )
    page = tab.page
    if why == "passkey-refused":
        # The authenticator can't verify the user: the ceremony ends in NotAllowedError.
        await tab.add_authenticator(isUserVerified=False)
    await console_login(tab, "carol", WANTED)
    await page.wait_for_url(SETUP_URL)
    totp_section = page.locator("#totp-section")

    if why == "passkey-refused":
        await expect(totp_section).to_be_hidden()
        await page.get_by_role("button", name="Create passkey").click()
        await expect(page.locator("#mfa-status")).to_contain_text("wasn't created")
        await expect(page.locator("#mfa-status")).to_contain_text("authenticator app instead")
    else:
        await expect(page.locator("#passkey-unsupported")).to_be_visible()
        await expect(page.get_by_role("button", name="Create passkey")).to_be_hidden()
    # The authenticator-app path is offered (opened for the user, and the link says so).
    await expect(totp_section).to_be_visible()
    await page.get_by_role("button", name="Use an authenticator app instead").click()
    await expect(totp_section).to_be_visible()
    await tab.shot(f"06-totp-fallback-{why}")

    secret = await show_totp_secret(tab)
    await tab.shot(f"07-totp-secret-{why}")
    await enter_totp(tab, pyotp.TOTP(secret).now())
    await save_recovery_codes(tab, f"08-totp-recovery-codes-{why}")
    await reached_console(tab, f"09-console-after-totp-{why}")
    assert not tab.unexpected_console_errors(), tab.console_errors


async def test_wrong_authenticator_code_shows_an_error_and_allows_a_retry(
    browser: Browser, stack: Stack, tabs: list[Tab]
) -> None:
    tab = await new_tab(browser, stack, tabs)
    page = tab.page
    await console_login(tab, "carol", WANTED)
    await page.wait_for_url(SETUP_URL)
    await page.get_by_role("button", name="Use an authenticator app instead").click()
    secret = await show_totp_secret(tab)

    await enter_totp(tab, wrong_code(secret))
    status = page.locator("#mfa-status")
    await expect(status).to_have_attribute("data-kind", "error")
    await expect(status).to_contain_text("didn't match")
    code_input = page.get_by_label("6-digit code from the app")
    await expect(code_input).to_have_attribute("aria-invalid", "true")
    await expect(code_input).to_be_focused()
    await expect(page.locator("#recovery-step")).to_be_hidden()
    await expect(
        page.get_by_role("button", name=re.compile(r"Verify and turn\s+on"))
    ).to_be_enabled()
    await tab.shot("10-totp-wrong-code", full_page=False)

    code = pyotp.TOTP(secret).now()
    await enter_totp(tab, f"{code[:3]} {code[3:]}")  # the spaced form an app displays
    await save_recovery_codes(tab, "11-totp-recovery-codes-after-retry")
    await reached_console(tab, "12-console-after-totp-retry")
    assert not tab.console_errors_except_4xx(), tab.console_errors

    # Another browser: the verify page asks for a code; a wrong one is refused, then the
    # next time step's code (the enrollment's step can't be replayed) gets carol in.
    other = await new_tab(browser, stack, tabs)
    page = other.page
    await console_login(other, "carol", WANTED)
    await page.wait_for_url(VERIFY_URL)
    await expect(page.locator("#passkey-verify")).to_have_count(0)
    verify_input = page.get_by_label("6-digit code from your authenticator app")
    await verify_input.fill(wrong_code(secret))
    await page.get_by_role("button", name="Verify", exact=True).click()
    await expect(page.locator("#mfa-status")).to_have_attribute("data-kind", "error")
    await expect(page.locator("#mfa-status")).to_contain_text("didn't work")
    await expect(verify_input).to_have_attribute("aria-invalid", "true")
    await other.shot("14-verify-totp-wrong-code", full_page=False)
    await verify_input.fill(pyotp.TOTP(secret).at(time.time() + 30))
    await page.get_by_role("button", name="Verify", exact=True).click()
    await reached_console(other, None)
    assert not other.console_errors_except_4xx(), other.console_errors
