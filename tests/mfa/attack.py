"""A harness for attack tests: a console with any users, a sidecar in front of it on SQLite or
PostgreSQL (optionally two replicas on one database), and browsers that sign in as anyone
from any client address.

Client addresses: the sidecar trusts 127.0.0.1 as a proxy, and each browser sends its own
``X-Forwarded-For``, so tests can put users behind one office address or spread an attacker
over many.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from sidecar.app import build_app
from sidecar.store import Store
from tests.conftest import deep_merge, make_config
from tests.mfa.softauthn import SoftAuthenticator
from tests.store.support import StoreKind, StoreTarget, fresh_database

ORIGIN = "http://localhost"
RP_ID = "localhost"
Client = TestClient[web.Request, web.Application]

BASE: dict[str, Any] = {
    "network": {"trusted_proxies": ["127.0.0.1/32"]},
    "security": {"mfa_policy": "optional"},
}


def console_app(users: dict[str, dict[str, Any]]) -> web.Application:
    """A console whose ``/api/me`` answers the user named by the ``console`` cookie (looked
    up in ``users`` at each call, so tests may add users or change roles as they go)."""
    app = web.Application()

    async def me(request: web.Request) -> web.Response:
        user = users.get(request.cookies.get("console", ""))
        if user is None:
            return web.json_response({"error": "unauthenticated"}, status=401)
        return web.json_response(user)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"console page {request.path}")

    app.router.add_get("/api/me", me)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


@dataclass
class Browser:
    """One browser: its own cookies (sidecar session), a console login and an address."""

    client: Client
    address: str

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"X-Forwarded-For": self.address, **(extra or {})}

    async def get(self, path: str, **kwargs: Any) -> ClientResponse:
        headers = self.headers(kwargs.pop("headers", None))
        return await self.client.get(path, headers=headers, allow_redirects=False, **kwargs)

    async def status(self) -> dict[str, Any]:
        response = await self.get("/mfa/api/status")
        assert response.status == 200, await response.text()
        data: dict[str, Any] = await response.json()
        return data

    async def call(
        self, path: str, body: Any = None, *, method: str = "POST", csrf: str | None = None
    ) -> ClientResponse:
        """A state-changing call as the pages make it: same origin, the CSRF token."""
        token = csrf if csrf is not None else (await self.status())["csrf_token"]
        headers = self.headers(
            {"X-CSRF-Token": token, "Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"}
        )
        return await self.client.request(
            method,
            path,
            data=json.dumps(body) if body is not None else None,
            headers={**headers, "Content-Type": "application/json"},
            allow_redirects=False,
        )

    async def enroll_totp(self) -> tuple[str, list[str] | None]:
        begun = await self.call("/mfa/api/totp/begin")
        assert begun.status == 200, await begun.text()
        secret: str = (await begun.json())["secret"]
        finished = await self.call("/mfa/api/totp/finish", {"code": pyotp.TOTP(secret).now()})
        assert finished.status == 200, await finished.text()
        return secret, (await finished.json())["recovery_codes"]

    async def enroll_passkey(self, authn: SoftAuthenticator) -> ClientResponse:
        begun = await self.call("/mfa/api/passkey/begin")
        assert begun.status == 200, await begun.text()
        return await self.call(
            "/mfa/api/passkey/finish", {"credential": authn.create(await begun.json()), "name": "k"}
        )

    async def verify_passkey(self, authn: SoftAuthenticator) -> ClientResponse:
        begun = await self.call("/mfa/api/verify/passkey/begin")
        assert begun.status == 200, await begun.text()
        return await self.call(
            "/mfa/api/verify/passkey/finish", {"credential": authn.get(await begun.json())}
        )


@dataclass
class Org:
    """A console and one or more sidecar replicas sharing one store database."""

    users: dict[str, dict[str, Any]]
    servers: list[TestServer]
    stores: list[Store]
    make_client: Callable[[TestServer], Awaitable[Client]]
    audit_file: Path
    _count: list[int] = field(default_factory=lambda: [0])

    def add_user(self, login: str, user_id: str, role: str = "member") -> None:
        self.users[login] = {"id": user_id, "email": f"{login}@example.com", "role": role}

    async def browser(
        self, login: str, *, address: str = "198.51.100.7", replica: int = 0
    ) -> Browser:
        client = await self.make_client(self.servers[replica])
        client.session.cookie_jar.update_cookies({"console": login}, URL(str(client.make_url("/"))))
        return Browser(client, address)

    def audit(self, action: str | None = None) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.audit_file.read_text().splitlines()]
        return [r for r in records if action is None or r["action"] == action]


OrgFactory = Callable[..., Awaitable[Org]]


async def org_factory(
    stack: AsyncExitStack,
    kind: StoreKind,
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> OrgFactory:
    async def factory(*, replicas: int = 1, **sections: Any) -> Org:
        users: dict[str, dict[str, Any]] = {}
        console = await aiohttp_server(console_app(users))
        target: StoreTarget = await stack.enter_async_context(fresh_database(kind, tmp_path))
        config = make_config(
            tmp_path, f"http://127.0.0.1:{console.port}", **deep_merge(BASE, sections)
        )
        stores: list[Store] = []
        servers: list[TestServer] = []
        for _ in range(replicas):
            store = target.open()
            await store.migrate()
            stores.append(store)
            # Closed by this stack before the database goes: the app's cleanup closes its
            # store, and no poller outlives it.
            server = TestServer(build_app(config, store=store))
            await server.start_server()
            stack.push_async_callback(server.close)
            servers.append(server)
        return Org(users, servers, stores, aiohttp_client, tmp_path / "audit.jsonl")

    return factory


async def gather_responses(
    calls: Sequence[Awaitable[ClientResponse]],
) -> list[tuple[int, dict[str, Any]]]:
    responses = await asyncio.gather(*calls)
    out = []
    for response in responses:
        try:
            body = await response.json()
        except (ValueError, json.JSONDecodeError):
            body = {"text": await response.text()}
        out.append((response.status, body))
    return out
