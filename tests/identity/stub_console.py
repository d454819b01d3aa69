"""A stub console for the identity tests: ``/api/me`` and misbehaving variants of it.

Every request is recorded (path and header lines) so tests can assert on what the sidecar
sent, and how often.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.fernet import Fernet
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Config, parse_config
from sidecar.net.forwarding import Forwarding

SESSION_COOKIE = "console_session"
SIDECAR_COOKIE = "sidecar_session"  # the config default for mfa.session.cookie_name
TOKENS = {"tok-carol": "u-carol"}
API_KEY_HEADER = "X-Api-Key"
API_KEYS = {"key-dave": "u-dave", "key-erin": "u-erin"}


def make_config(upstream_url: str = "http://127.0.0.1:9", **identity: Any) -> Config:
    """A minimal valid config with ``identity`` as the identity section."""
    key = Fernet.generate_key().decode()
    return parse_config(
        {
            "upstream": {"url": upstream_url},
            "identity": identity,
            "mfa": {
                "rp_id": "localhost",
                "origin": "http://localhost",
                "session": {"secret_keys": [key]},
            },
            "storage": {"encryption_key": key},
        },
        env={},
    )


#: The forwarding context of a plain request from a client on the test network.
FORWARDING = Forwarding(client_ip="192.0.2.10", proto="https", host="console.example")


def headers(*lines: tuple[str, str]) -> CIMultiDictProxy[str]:
    """Request headers as aiohttp hands them over, lines in order."""
    return CIMultiDictProxy(CIMultiDict(lines))


@dataclass
class Recorded:
    path: str
    headers: CIMultiDict[str]


@dataclass
class StubConsole:
    """State of the stub: what it received, and knobs the tests turn."""

    url: str = ""
    received: list[Recorded] = field(default_factory=list)
    # /api/me-gated: `entered` is set when a request arrives; it answers once `gate` is set,
    # with `gated_status` (200 means: like /api/me).
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    gated_status: int = 200
    # /api/me-slow answers once `release` is set (at teardown at the latest).
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # /api/me-flaky answers 500 while `down`.
    down: bool = False
    # /api/me-bound answers like /api/me only when the request carries these header values
    # (a console that ties sessions to a host, a scheme or a client address), else 401.
    bound: dict[str, str] = field(default_factory=dict)
    # /api/me-set-cookie answers like /api/me with this Set-Cookie line.
    set_cookie: str = ""

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.received if path is None or r.path == path)


def _document(user: str, role: str, credential: str) -> dict[str, Any]:
    """A user document that also says which kind of credential the console accepted, as
    ``credential``, nested (``auth.kind``), in a list (``auth.kinds``) and as a boolean
    (``auth.api``), for the API-token rule's variants."""
    return {
        "id": user,
        "email": f"{user[2:]}@example.com",
        "role": role,
        "credential": credential,
        "auth": {"kind": credential, "kinds": [credential], "api": credential == "api_token"},
    }


def _session(value: str) -> dict[str, Any] | int | None:
    if value == "forbidden":
        return 403
    if value.startswith("u-"):
        return _document(value, "owner" if value == "u-alice" else "member", "session")
    return None


def _user_for(request: web.Request) -> dict[str, Any] | int | None:
    """The /api/me answer: a user document, None (401) or a status (403).

    Credentials: API keys, ``Bearer tok-carol`` (an API token), and the session cookie,
    whose value is also accepted as a bearer token (as many consoles accept their own
    session token in ``Authorization``).
    """
    for line in request.headers.getall(API_KEY_HEADER, ()):
        if line in API_KEYS:
            return _document(API_KEYS[line], "member", "api_key")
    for line in request.headers.getall("Authorization", ()):
        scheme, _, token = line.partition(" ")
        if scheme.lower() != "bearer":
            continue
        if token in TOKENS:
            return _document(TOKENS[token], "member", "api_token")
        if (session := _session(token)) is not None:
            return session
    for name, morsel in request.cookies.items():
        if name == SESSION_COOKIE and (session := _session(morsel)) is not None:
            return session
    return None


def _me(request: web.Request) -> web.Response:
    user = _user_for(request)
    if user is None:
        return web.json_response({"error": "unauthorized"}, status=401)
    if isinstance(user, int):
        return web.json_response({"error": "forbidden"}, status=user)
    return web.json_response(user)


def build_console(state: StubConsole) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        state.received.append(Recorded(request.path, CIMultiDict(request.headers)))
        response: web.StreamResponse = await handler(request)
        return response

    async def me(request: web.Request) -> web.Response:
        return _me(request)

    async def nested(request: web.Request) -> web.Response:
        user = _user_for(request)
        if not isinstance(user, dict):
            return web.json_response({}, status=401)
        return web.json_response(
            {
                "user": {
                    "id": 42,
                    "profile": {"mail": user["email"]},
                    "groups": ["member", "Admin"],
                }
            }
        )

    async def error(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    async def slow(request: web.Request) -> web.Response:
        await state.release.wait()
        return _me(request)

    async def not_json(request: web.Request) -> web.Response:
        return web.Response(text="<html>login</html>", content_type="text/html")

    async def array(request: web.Request) -> web.Response:
        return web.json_response([{"id": "u-alice"}])

    async def no_id(request: web.Request) -> web.Response:
        return web.json_response({"email": "alice@example.com", "role": "owner"})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/api/me")

    async def huge(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps({"id": "u-alice", "pad": "x" * (2 * 1024 * 1024)}))

    async def gated(request: web.Request) -> web.Response:
        state.entered.set()
        await state.gate.wait()
        if state.gated_status != 200:
            return web.Response(status=state.gated_status)
        return _me(request)

    async def flaky(request: web.Request) -> web.Response:
        if state.down:
            return web.Response(status=502)
        return _me(request)

    async def bound(request: web.Request) -> web.Response:
        for name, value in state.bound.items():
            if request.headers.getall(name, []) != [value]:
                return web.json_response({"error": "unauthorized"}, status=401)
        return _me(request)

    async def set_cookie(request: web.Request) -> web.Response:
        response = _me(request)
        response.headers["Set-Cookie"] = state.set_cookie
        return response

    app = web.Application(middlewares=[record])
    app.router.add_get("/api/me-bound", bound)
    app.router.add_get("/api/me-set-cookie", set_cookie)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/me-nested", nested)
    app.router.add_get("/api/me-500", error)
    app.router.add_get("/api/me-slow", slow)
    app.router.add_get("/api/me-html", not_json)
    app.router.add_get("/api/me-array", array)
    app.router.add_get("/api/me-noid", no_id)
    app.router.add_get("/api/me-redirect", redirect)
    app.router.add_get("/api/me-huge", huge)
    app.router.add_get("/api/me-gated", gated)
    app.router.add_get("/api/me-flaky", flaky)
    return app
