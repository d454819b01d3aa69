"""A reload reaches every route: each reloadable key, changed in the file and reloaded (as
SIGHUP does), changes what the next request gets, on every route that reads it.

Each case is (the YAML change, a probe); the probe runs against a running sidecar before and
after the reload and must answer differently (and as the new value says). A component that
kept its own copy of the config at start fails its case.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer

from sidecar.app import MFA, build_app
from sidecar.config import load_config
from sidecar.reload import Reloader
from tests.conftest import deep_merge, raw_config
from tests.mfa.attack import BASE, Browser, Client, Org, console_app
from tests.mfa.softauthn import SoftAuthenticator

RP_ID, ORIGIN = "localhost", "http://localhost"
Probe = Callable[["Running"], Awaitable[object]]


@dataclass
class Running:
    org: Org
    path: Path
    raw: dict[str, Any]
    authenticators: dict[str, SoftAuthenticator]

    async def reload(self, **change: Any) -> None:
        self.raw = deep_merge(self.raw, change)
        self.path.write_text(yaml.safe_dump(self.raw))
        assert await Reloader(self.org.servers[0].app, self.path).reload("test") is True

    async def verified(self, login: str) -> Browser:
        """A browser of ``login`` (enrolled with a passkey the first time) verified just now."""
        browser = await self.org.browser(login)
        authn = self.authenticators.get(login)
        if authn is None:
            authn = self.authenticators[login] = SoftAuthenticator(RP_ID, ORIGIN)
            response = await browser.enroll_passkey(authn)
        else:
            response = await browser.verify_passkey(authn)
        assert response.status == 200, await response.text()
        return browser


@pytest.fixture
async def running(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> AsyncIterator[Running]:
    users: dict[str, dict[str, Any]] = {}
    console = await aiohttp_server(console_app(users))
    # managed_by config: the YAML's security section is live (reloads apply it).
    sections = deep_merge(BASE, {"security": {"managed_by": "config"}})
    raw = raw_config(tmp_path, f"http://127.0.0.1:{console.port}", **sections)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    async with AsyncExitStack() as stack:
        server = TestServer(build_app(load_config(path)))
        await server.start_server()
        stack.push_async_callback(server.close)
        org = Org(
            users, [server], [server.app[MFA].store], aiohttp_client, tmp_path / "audit.jsonl"
        )
        org.add_user("ops", "u-ops", role="operator")
        org.add_user("bob", "u-bob", role="admin")
        org.add_user("carol", "u-carol")
        yield Running(org, path, raw, {})


async def status_of(browser: Browser, path: str, **kwargs: Any) -> int:
    return (await browser.get(path, **kwargs)).status


async def admin_routes(run: Running, login: str) -> list[int]:
    """What a verified ``login`` gets from every admin route and page."""
    browser = await run.verified(login)
    statuses = [
        await status_of(browser, p)
        for p in (
            "/mfa/api/admin/security",
            "/mfa/api/admin/security/preview?mfa_policy=all",
            "/mfa/api/admin/audit",
            "/mfa/audit",
        )
    ]
    reset = await browser.call("/mfa/api/admin/users/u-carol/reset-mfa")
    statuses.append(reset.status)
    page = await browser.get("/mfa/security")
    statuses.append(
        200 if "Org security" in await page.text() or "ip-form" in await page.text() else 0
    )
    return statuses


async def test_admin_roles_reach_the_admin_api_the_audit_page_and_the_security_page(
    running: Running,
) -> None:
    assert await admin_routes(running, "ops") == [403, 403, 403, 403, 403, 0]
    assert await admin_routes(running, "bob") == [200, 200, 200, 200, 200, 200]
    await running.reload(identity={"admin_roles": ["operator"]})
    assert await admin_routes(running, "ops") == [200, 200, 200, 200, 200, 200]
    assert await admin_routes(running, "bob") == [403, 403, 403, 403, 403, 0]


async def test_exempt_paths_reach_the_gate(running: Running) -> None:
    await running.reload(security={"mfa_policy": "all", "grace_period": "0s"})
    carol = await running.org.browser("carol")
    json = {"Accept": "application/json"}
    assert await status_of(carol, "/public/x", headers=json) == 403
    await running.reload(mfa={"exempt_paths": ["/public/"]})
    assert await status_of(carol, "/public/x", headers=json) == 200


async def test_lockout_limits_reach_every_counted_route(running: Running) -> None:
    carol = await running.org.browser("carol")
    await carol.enroll_totp()
    await running.reload(mfa={"lockout": {"max_failures": 1}})
    first = await carol.call("/mfa/api/verify/totp", {"code": "000000"})
    assert first.status == 429  # one failure is the limit now
    other = await running.org.browser("bob")
    await other.enroll_totp()
    await running.reload(mfa={"lockout": {"max_failures": 10, "max_failures_per_address": 1}})
    assert (await other.call("/mfa/api/verify/recovery", {"code": "AAAAA-BBBBB"})).status == 429


async def test_origins_reach_the_csrf_check(running: Running) -> None:
    carol = await running.org.browser("carol")
    token = (await carol.status())["csrf_token"]
    headers = carol.headers({"X-CSRF-Token": token, "Origin": "http://localhost:8443"})
    begin = "/mfa/api/totp/begin"
    assert (await carol.client.post(begin, headers=headers)).status == 403
    await running.reload(mfa={"origin": ["http://localhost", "http://localhost:8443"]})
    assert (await carol.client.post(begin, headers=headers)).status == 200


async def test_verify_every_reaches_the_gate_and_the_status(running: Running) -> None:
    await running.reload(security={"mfa_policy": "all", "grace_period": "0s"})
    carol = await running.verified("carol")
    json = {"Accept": "application/json"}
    assert await status_of(carol, "/settings", headers=json) == 200
    assert (await carol.status())["verified"]
    await running.reload(mfa={"verify_every": "1ms"})
    assert await status_of(carol, "/settings", headers=json) == 403
    assert not (await carol.status())["verified"]


async def test_the_body_size_cap_reaches_the_proxy(running: Running) -> None:
    carol = await running.org.browser("carol")
    body = b"x" * 2048
    assert (await carol.client.post("/upload", data=body, headers=carol.headers())).status == 200
    await running.reload(listen={"max_body_size": 1024})
    assert (await carol.client.post("/upload", data=body, headers=carol.headers())).status == 413


async def test_network_settings_reach_the_client_ip_stage_and_the_ip_gate(running: Running) -> None:
    carol = await running.org.browser("carol")
    await running.reload(security={"ip_denylist": ["198.51.100.0/24"]})
    assert await status_of(carol, "/x") == 403
    await running.reload(network={"block_status": 451})
    assert await status_of(carol, "/x") == 451
    # Trust withdrawn from the local proxy: the TCP peer (127.0.0.1) is the client again.
    await running.reload(network={"trusted_proxies": []})
    assert await status_of(carol, "/x") == 200


async def test_identity_settings_reach_the_identity_stage(running: Running) -> None:
    carol = await running.org.browser("carol")
    assert (await carol.get("/mfa/api/status")).status == 200
    await running.reload(identity={"introspect": {"id_field": "uid"}})
    assert (await carol.get("/mfa/api/status")).status == 503  # no such field: fail closed
