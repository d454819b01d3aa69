"""Codes never travel in URLs, in a real browser: Debian Chromium in front of the demo console
and the sidecar, with JavaScript off and on.

- Script off: the verify page says it needs JavaScript and its forms are disabled, so the
  browser cannot submit a code the GET way (into the address bar and history). Even with the
  forms enabled by hand (devtools), they post: no request the browser makes carries the code
  in its URL, and nothing is verified.
- Script on: the same page verifies the code (sent as JSON), again without it in any URL.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pyotp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, PASSWORD, Stack, running_stack

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"
    ),
    pytest.mark.asyncio(loop_scope="module"),
]

WANTED = "/reports?team=ops"
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


async def enroll_carol(stack: Stack) -> tuple[str, list[str]]:
    """Carol signs in to the console and turns on an authenticator app, over plain HTTP
    (another device). Her authenticator secret and recovery codes."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(stack.base, cookie_jar=jar) as http:
        signed_in = await http.post(
            "/login", data={"username": "carol", "password": PASSWORD}, allow_redirects=False
        )
        assert signed_in.status == 303, await signed_in.text()
        token = (await (await http.get("/mfa/api/status")).json())["csrf_token"]
        begun = await http.post("/mfa/api/totp/begin", headers={"X-CSRF-Token": token})
        secret = str((await begun.json())["secret"])
        finished = await http.post(
            "/mfa/api/totp/finish",
            json={"code": pyotp.TOTP(secret).now()},
            headers={"X-CSRF-Token": token},
        )
        assert finished.status == 200, await finished.text()
        codes = [str(code) for code in (await finished.json())["recovery_codes"]]
    return secret, codes


async def open_verify_page(
    browser: Browser, stack: Stack, *, javascript: bool
) -> tuple[BrowserContext, Page, list[str]]:
    """Carol, in a new browser, signs in to the console and is sent to the verify page.
    Also returns the URL of every request the page makes from then on."""
    context = await browser.new_context(base_url=stack.base, java_script_enabled=javascript)
    context.set_default_timeout(10_000)
    page = await context.new_page()
    await page.goto(WANTED)
    await page.get_by_label("Username or email").fill("carol")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(VERIFY_URL)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    return context, page, requested


async def test_without_javascript_the_verify_page_cannot_put_a_code_in_the_url(
    browser: Browser, stack: Stack
) -> None:
    secret, recovery_codes = await enroll_carol(stack)
    context, page, requested = await open_verify_page(browser, stack, javascript=False)
    verify_url = page.url
    try:
        # The page says so. (Playwright's "JavaScript off" stops scripts but leaves the HTML
        # parser's scripting flag on, so <noscript> is not rendered here as it is for people
        # who turn JavaScript off in their browser: check what was served.)
        notice = " ".join((await page.locator("noscript").inner_text()).split())
        assert "This page needs JavaScript to confirm it's you." in notice
        await page.get_by_text("Use a recovery code").click()  # <details> opens without script
        code = pyotp.TOTP(secret).at(time.time() + 30)
        code_input = page.get_by_label("6-digit code from your authenticator app")
        recovery_input = page.get_by_label("Recovery code")
        verify = page.get_by_role("button", name="Verify", exact=True)
        use_recovery = page.get_by_role("button", name="Use recovery code")
        for control in (code_input, recovery_input, verify, use_recovery):
            await expect(control).to_be_disabled()

        # Pressing the disabled buttons does nothing.
        await verify.click(force=True)
        await use_recovery.click(force=True)
        await expect(page).to_have_url(VERIFY_URL)

        # Someone enables the forms by hand: they post, so the code stays out of the URL.
        await page.evaluate(
            "document.querySelectorAll('fieldset').forEach((f) => { f.disabled = false; })"
        )
        await code_input.fill(code)
        async with page.expect_navigation():
            await verify.click()
        await page.goto(verify_url)
        await page.get_by_text("Use a recovery code").click()
        await page.evaluate(
            "document.querySelectorAll('fieldset').forEach((f) => { f.disabled = false; })"
        )
        await recovery_input.fill(recovery_codes[0])
        async with page.expect_navigation():
            await use_recovery.click()

        assert requested, "the forms were never submitted"
        for url in requested:
            assert code not in url, url
            assert recovery_codes[0] not in url, url
            assert "code=" not in url, url
        # Nothing was verified: the console page still sends carol to confirm it's her.
        await page.goto(WANTED)
        await expect(page).to_have_url(VERIFY_URL)
    finally:
        await context.close()


async def test_with_javascript_the_verify_page_sends_the_code_in_the_body(
    browser: Browser, stack: Stack
) -> None:
    secret, _ = await enroll_carol(stack)
    context, page, requested = await open_verify_page(browser, stack, javascript=True)
    try:
        await expect(page.get_by_text("This page needs JavaScript")).to_be_hidden()
        code = pyotp.TOTP(secret).at(time.time() + 30)
        code_input = page.get_by_label("6-digit code from your authenticator app")
        await expect(code_input).to_be_enabled()
        await code_input.fill(code)
        await page.get_by_role("button", name="Verify", exact=True).click()
        await page.wait_for_url(re.compile(re.escape(WANTED) + "$"))
        await expect(page.get_by_role("heading", level=1)).to_have_text("Reports")
        assert any(url.endswith("/mfa/api/verify/totp") for url in requested), requested
        assert not [url for url in requested if code in url or "code=" in url]
    finally:
        await context.close()
