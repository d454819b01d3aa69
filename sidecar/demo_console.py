"""A small stand-in for "an existing web console", used by ``sidecar demo`` and by tests.

It knows nothing about the sidecar. It has its own login (an opaque ``console_session``
cookie), a few server-rendered pages, a JSON API with bearer tokens and a WebSocket echo, so
that the sidecar has something realistic to sit in front of. ``GET /api/me`` is what the
sidecar's identity introspection calls; besides the user it says which kind of credential
it accepted (``credential``): ``api_token`` for the ``demo-token-<name>`` API tokens,
``session`` for the login session, whether its token comes in the cookie or, as many
consoles allow, as ``Authorization: Bearer <session token>``. The demo's sidecar recognises
API tokens by that field, so only they skip the MFA gate.

Security assumption: this is a demo. Every user's password is ``demo`` and the API tokens are
guessable (``demo-token-<name>``); never expose it beyond a test or a local demo.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import quote

from aiohttp import WSMsgType, web

from sidecar.paths import local_path_or

SESSION_COOKIE = "console_session"
WS_SUBPROTOCOL = "echo.v1"
_BEARER_PREFIX = "demo-token-"


@dataclass(frozen=True)
class DemoUser:
    id: str
    email: str
    name: str
    role: str
    password: str

    @property
    def username(self) -> str:
        """The login name: the id without its ``u-`` prefix (``u-alice`` -> ``alice``)."""
        return self.id.removeprefix("u-")

    def public(self) -> dict[str, str]:
        """The fields ``/api/me`` returns (never the password)."""
        return {"id": self.id, "email": self.email, "name": self.name, "role": self.role}


DEMO_USERS: tuple[DemoUser, ...] = (
    DemoUser("u-alice", "alice@example.com", "Alice Owner", "owner", "demo"),
    DemoUser("u-bob", "bob@example.com", "Bob Admin", "admin", "demo"),
    DemoUser("u-carol", "carol@example.com", "Carol Member", "member", "demo"),
    DemoUser("u-dave", "dave@example.com", "Dave Member", "member", "demo"),
)

USERS_KEY = web.AppKey("demo_console_users", dict[str, DemoUser])
"""User id -> user."""
SESSIONS_KEY = web.AppKey("demo_console_sessions", dict[str, str])
"""Opaque session token -> user id. In memory: a restart logs everyone out."""

REPORTS: tuple[dict[str, str | int], ...] = (
    {"id": "r-1", "title": "Monthly active users", "owner": "u-alice", "rows": 1204},
    {"id": "r-2", "title": "Failed logins", "owner": "u-bob", "rows": 37},
    {"id": "r-3", "title": "Storage by team", "owner": "u-carol", "rows": 12},
)

APP_CSS = """\
body { font: 15px/1.5 system-ui, sans-serif; margin: 0; color: #1d2430; background: #f6f7f9; }
main { max-width: 52rem; margin: 1.5rem auto; padding: 0 1rem; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { border: 1px solid #d5d9e0; padding: .4rem .6rem; text-align: left; }
label { display: block; margin-top: .8rem; }
input { font: inherit; padding: .3rem; }
.error { color: #a4161a; font-weight: 600; }
"""

_INLINE_CSS = (
    "nav{display:flex;gap:1rem;align-items:center;padding:.6rem 1rem;background:#243b53}"
    "nav a,nav span{color:#fff}nav .who{margin-left:auto}"
)


def safe_next(target: str | None) -> str:
    """Return ``target`` if a browser resolves it on this site, else ``/``: the sidecar's own
    local-redirect rule (``sidecar.paths.is_local_path``)."""
    return local_path_or(target, "/")


#: ``/api/me``'s ``credential`` values.
SESSION_CREDENTIAL = "session"
API_TOKEN_CREDENTIAL = "api_token"  # noqa: S105 - a label, not a secret


def current_credential(request: web.Request) -> tuple[DemoUser, str] | None:
    """The user and the kind of credential that proved it: the session cookie, the session
    token as ``Authorization: Bearer`` (``session``), or ``Bearer demo-token-<name>``
    (``api_token``). The cookie wins when both are sent."""
    users = request.app[USERS_KEY]
    sessions = request.app[SESSIONS_KEY]
    token = request.cookies.get(SESSION_COOKIE)
    if token and (user_id := sessions.get(token)) is not None and user_id in users:
        return users[user_id], SESSION_CREDENTIAL
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    if credential.startswith(_BEARER_PREFIX):
        user = users.get("u-" + credential.removeprefix(_BEARER_PREFIX))
        if user is not None and hmac.compare_digest(
            credential.encode(), (_BEARER_PREFIX + user.username).encode()
        ):
            return user, API_TOKEN_CREDENTIAL
        return None
    if credential and (user_id := sessions.get(credential)) is not None and user_id in users:
        return users[user_id], SESSION_CREDENTIAL
    return None


def current_user(request: web.Request) -> DemoUser | None:
    """The user behind the session (cookie or bearer) or a demo API token."""
    found = current_credential(request)
    return found[0] if found else None


def _page(title: str, body: str, user: DemoUser | None = None, status: int = 200) -> web.Response:
    nav = ""
    if user is not None:
        nav = (
            '<nav aria-label="Main"><a href="/">Dashboard</a><a href="/reports">Reports</a>'
            '<a href="/settings">Settings</a><a href="/ws">WebSocket</a>'
            f'<span class="who">{escape(user.name)} ({escape(user.role)})</span>'
            '<form method="post" action="/logout"><button type="submit">Log out</button></form>'
            "</nav>"
        )
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} - Demo Console</title>"
        f'<link rel="stylesheet" href="/static/app.css"><style>{_INLINE_CSS}</style></head>'
        f"<body>{nav}<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )
    return web.Response(text=html, content_type="text/html", status=status)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _unauthenticated() -> web.Response:
    return web.json_response({"error": "unauthenticated"}, status=401)


def _login_form(next_path: str, error: str | None = None, status: int = 200) -> web.Response:
    alert = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    body = (
        f"{alert}<p>Demo users: alice (owner), bob (admin), carol and dave (members). "
        "The password for all of them is <code>demo</code>: this is a demo console.</p>"
        '<form method="post" action="/login">'
        f'<input type="hidden" name="next" value="{escape(next_path)}">'
        '<label for="username">Username or email</label>'
        '<input id="username" name="username" autocomplete="username" required autofocus>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" '
        'autocomplete="current-password" required>'
        '<p><button type="submit">Log in</button></p></form>'
    )
    return _page("Log in", body, status=status)


async def login_page(request: web.Request) -> web.Response:
    return _login_form(safe_next(request.query.get("next")))


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    name = str(form.get("username") or form.get("email") or "").strip().lower()
    password = str(form.get("password") or "")
    next_path = safe_next(str(form.get("next") or request.query.get("next") or ""))
    user = next(
        (u for u in request.app[USERS_KEY].values() if name in (u.username, u.email.lower())),
        None,
    )
    if user is None or not hmac.compare_digest(password.encode(), user.password.encode()):
        return _login_form(next_path, "Unknown user or wrong password.", status=401)
    token = secrets.token_urlsafe(32)
    request.app[SESSIONS_KEY][token] = user.id
    response = _see_other(next_path)
    response.set_cookie(
        SESSION_COOKIE, token, path="/", httponly=True, samesite="Lax", secure=request.secure
    )
    return response


async def logout(request: web.Request) -> web.Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        request.app[SESSIONS_KEY].pop(token, None)
    response = _see_other("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def _require_page_user(request: web.Request) -> DemoUser | web.Response:
    user = current_user(request)
    if user is None:
        return _see_other("/login?next=" + quote(request.path_qs, safe=""))
    return user


async def dashboard(request: web.Request) -> web.Response:
    user = _require_page_user(request)
    if isinstance(user, web.Response):
        return user
    body = (
        f"<p>Welcome, {escape(user.name)}. You are signed in as "
        f"<strong>{escape(user.email)}</strong> with role <strong>{escape(user.role)}</strong>."
        "</p><p>This console has no idea a sidecar may be sitting in front of it.</p>"
    )
    return _page("Dashboard", body, user)


async def settings(request: web.Request) -> web.Response:
    user = _require_page_user(request)
    if isinstance(user, web.Response):
        return user
    rows = "".join(
        f"<tr><th scope='row'>{escape(k)}</th><td>{escape(v)}</td></tr>"
        for k, v in user.public().items()
    )
    body = f"<table><caption>Your account</caption>{rows}</table>"
    return _page("Settings", body, user)


async def reports(request: web.Request) -> web.Response:
    user = _require_page_user(request)
    if isinstance(user, web.Response):
        return user
    rows = "".join(
        f"<tr><td>{escape(str(r['id']))}</td><td>{escape(str(r['title']))}</td>"
        f"<td>{escape(str(r['owner']))}</td><td>{escape(str(r['rows']))}</td></tr>"
        for r in REPORTS
    )
    body = (
        "<table><caption>Reports</caption><thead><tr><th scope='col'>Id</th>"
        "<th scope='col'>Title</th><th scope='col'>Owner</th><th scope='col'>Rows</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )
    return _page("Reports", body, user)


_WS_CLIENT_JS = """
const log = document.getElementById("log");
const show = (text) => { const li = document.createElement("li"); li.textContent = text;
  log.appendChild(li); };
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const ws = new WebSocket(scheme + "//" + location.host + "/ws/echo", ["echo.v1"]);
ws.onopen = () => show("connected (" + (ws.protocol || "no subprotocol") + ")");
ws.onmessage = (ev) => show("echo: " + ev.data);
ws.onclose = (ev) => show("closed (" + ev.code + ")");
document.getElementById("send").addEventListener("submit", (ev) => {
  ev.preventDefault(); const input = document.getElementById("msg");
  if (ws.readyState === WebSocket.OPEN) { ws.send(input.value); show("sent: " + input.value); }
  input.value = ""; });
"""


async def ws_page(request: web.Request) -> web.Response:
    user = _require_page_user(request)
    if isinstance(user, web.Response):
        return user
    body = (
        '<form id="send"><label for="msg">Message</label>'
        '<input id="msg" autocomplete="off"> <button type="submit">Send</button></form>'
        f'<ul id="log" aria-live="polite"></ul><script>{_WS_CLIENT_JS}</script>'
    )
    return _page("WebSocket echo", body, user)


async def ws_echo(request: web.Request) -> web.StreamResponse:
    # Refuse before the upgrade, so an anonymous client never gets a socket.
    if current_user(request) is None:
        return _unauthenticated()
    ws = web.WebSocketResponse(protocols=(WS_SUBPROTOCOL,))
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def api_me(request: web.Request) -> web.Response:
    found = current_credential(request)
    if found is None:
        return _unauthenticated()
    user, credential = found
    return web.json_response({**user.public(), "credential": credential})


async def api_reports(request: web.Request) -> web.Response:
    if current_user(request) is None:
        return _unauthenticated()
    return web.json_response({"reports": [dict(r) for r in REPORTS]})


async def static_css(request: web.Request) -> web.Response:
    return web.Response(text=APP_CSS, content_type="text/css")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_demo_console(users: Sequence[DemoUser] = DEMO_USERS) -> web.Application:
    """Build the demo console app; each app has its own users and its own session table."""
    app = web.Application()
    app[USERS_KEY] = {u.id: u for u in users}
    app[SESSIONS_KEY] = {}
    app.add_routes(
        [
            web.get("/login", login_page),
            web.post("/login", login),
            web.get("/logout", logout),
            web.post("/logout", logout),
            web.get("/", dashboard),
            web.get("/settings", settings),
            web.get("/reports", reports),
            web.get("/ws", ws_page),
            web.get("/ws/echo", ws_echo),
            web.get("/api/me", api_me),
            web.get("/api/reports", api_reports),
            web.get("/static/app.css", static_css),
            web.get("/healthz", healthz),
        ]
    )
    return app


__all__ = [
    "API_TOKEN_CREDENTIAL",
    "DEMO_USERS",
    "SESSIONS_KEY",
    "SESSION_COOKIE",
    "SESSION_CREDENTIAL",
    "USERS_KEY",
    "DemoUser",
    "build_demo_console",
    "current_credential",
    "current_user",
    "safe_next",
]
