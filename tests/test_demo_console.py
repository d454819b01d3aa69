"""The demo console behaves like a small real console: login, pages, JSON API, WebSocket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from sidecar.demo_console import (
    DEMO_USERS,
    SESSION_COOKIE,
    DemoUser,
    build_demo_console,
)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


@pytest.fixture
async def client(aiohttp_client: ClientFactory) -> Client:
    return await aiohttp_client(build_demo_console())


async def log_in(client: Client, username: str = "carol", next_path: str = "") -> str:
    resp = await client.post(
        "/login",
        data={"username": username, "password": "demo", "next": next_path},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    return resp.headers["Location"]


def test_demo_users_are_the_documented_four() -> None:
    assert [(u.id, u.email, u.role) for u in DEMO_USERS] == [
        ("u-alice", "alice@example.com", "owner"),
        ("u-bob", "bob@example.com", "admin"),
        ("u-carol", "carol@example.com", "member"),
        ("u-dave", "dave@example.com", "member"),
    ]


@pytest.mark.parametrize("username", ["bob", "bob@example.com", "BOB@Example.com"])
async def test_login_sets_a_session_cookie(client: Client, username: str) -> None:
    resp = await client.post(
        "/login", data={"username": username, "password": "demo"}, allow_redirects=False
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/"
    set_cookie = resp.headers["Set-Cookie"]
    assert set_cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in set_cookie
    assert "SameSite=Lax" in set_cookie
    me = await client.get("/api/me")
    assert me.status == 200
    assert await me.json() == {
        "id": "u-bob",
        "email": "bob@example.com",
        "name": "Bob Admin",
        "role": "admin",
        "credential": "session",
    }


async def test_login_accepts_the_email_field(client: Client) -> None:
    resp = await client.post(
        "/login", data={"email": "dave@example.com", "password": "demo"}, allow_redirects=False
    )
    assert resp.status == 303
    assert (await (await client.get("/api/me")).json())["id"] == "u-dave"


@pytest.mark.parametrize(
    ("username", "password"),
    [
        pytest.param("carol", "wrong", id="wrong-password"),
        pytest.param("mallory", "demo", id="unknown-user"),
        pytest.param("", "demo", id="empty-username"),
        pytest.param("u-carol", "demo", id="id-with-prefix-is-not-a-username"),
    ],
)
async def test_login_failure_rerenders_the_form(
    client: Client, username: str, password: str
) -> None:
    resp = await client.post(
        "/login",
        data={"username": username, "password": password, "next": "/reports"},
        allow_redirects=False,
    )
    assert resp.status == 401
    assert "Set-Cookie" not in resp.headers
    html = await resp.text()
    assert 'role="alert"' in html
    assert 'name="next" value="/reports"' in html
    assert (await client.get("/api/me")).status == 401


@pytest.mark.parametrize(
    ("next_path", "location"),
    [
        pytest.param("/reports?range=7d", "/reports?range=7d", id="relative-path-kept"),
        pytest.param("", "/", id="missing"),
        pytest.param("//evil.example", "/", id="scheme-relative"),
        pytest.param("https://evil.example/", "/", id="absolute-url"),
        pytest.param("/\\evil.example", "/", id="backslash"),
        pytest.param("javascript:alert(1)", "/", id="javascript-url"),
        pytest.param("reports", "/", id="not-rooted"),
        pytest.param("/a\r\nSet-Cookie: x=1", "/", id="control-characters"),
    ],
)
async def test_login_redirects_only_to_same_origin_paths(
    client: Client, next_path: str, location: str
) -> None:
    assert await log_in(client, next_path=next_path) == location


async def test_login_page_is_accessible_and_escapes_next(client: Client) -> None:
    resp = await client.get("/login", params={"next": '/x"><script>alert(1)</script>'})
    assert resp.status == 200
    html = await resp.text()
    assert "<script>alert(1)" not in html
    assert 'autocomplete="username"' in html
    assert 'autocomplete="current-password"' in html
    assert '<label for="password">' in html
    assert "demo" in html


@pytest.mark.parametrize("path", ["/", "/settings", "/reports", "/ws"])
async def test_anonymous_page_request_redirects_to_login(client: Client, path: str) -> None:
    resp = await client.get(f"{path}?range=7d&x=1", allow_redirects=False)
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith("/login?next=%2F")
    # Following the redirect and logging in lands back on the original page.
    login_page = await client.get(location)
    assert login_page.status == 200
    assert await log_in(client, next_path=login_page.url.query["next"]) == f"{path}?range=7d&x=1"


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/", "Carol Member"),
        ("/settings", "carol@example.com"),
        ("/reports", "Failed logins"),
        ("/ws", "/ws/echo"),
    ],
)
async def test_pages_show_the_signed_in_user(client: Client, path: str, text: str) -> None:
    await log_in(client)
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert text in html
    assert "Carol Member (member)" in html


async def test_user_values_are_html_escaped(aiohttp_client: ClientFactory) -> None:
    evil = DemoUser("u-eve", "eve@example.com", "<b>Eve</b>", "<i>r</i>", "demo")
    client = await aiohttp_client(build_demo_console([evil]))
    await log_in(client, "eve")
    html = await (await client.get("/")).text()
    assert "<b>Eve</b>" not in html
    assert "&lt;b&gt;Eve&lt;/b&gt;" in html
    assert "<i>r</i>" not in html


@pytest.mark.parametrize(
    ("authorization", "expected_id"),
    [
        pytest.param("Bearer demo-token-carol", "u-carol", id="carol"),
        pytest.param("bearer demo-token-alice", "u-alice", id="scheme-case-insensitive"),
        pytest.param("Bearer demo-token-mallory", None, id="unknown-user"),
        pytest.param("Bearer demo-token-", None, id="empty-name"),
        pytest.param("Bearer carol", None, id="not-a-demo-token"),
        pytest.param("Basic demo-token-carol", None, id="wrong-scheme"),
    ],
)
async def test_api_me_with_bearer_token(
    client: Client, authorization: str, expected_id: str | None
) -> None:
    resp = await client.get("/api/me", headers={"Authorization": authorization})
    if expected_id is None:
        assert resp.status == 401
        assert await resp.json() == {"error": "unauthenticated"}
    else:
        assert resp.status == 200
        assert (await resp.json())["id"] == expected_id


async def session_token(client: Client) -> str:
    value: str = client.session.cookie_jar.filter_cookies(client.make_url("/"))[
        SESSION_COOKIE
    ].value
    return value


async def test_api_me_says_which_kind_of_credential_it_accepted(client: Client) -> None:
    api = await client.get("/api/me", headers={"Authorization": "Bearer demo-token-dave"})
    assert await api.json() == {**DEMO_USERS[3].public(), "credential": "api_token"}
    await log_in(client)  # carol: the cookie wins over a token sent with it
    both = await client.get("/api/me", headers={"Authorization": "Bearer demo-token-dave"})
    assert await both.json() == {**DEMO_USERS[2].public(), "credential": "session"}


async def test_the_session_token_is_accepted_as_a_bearer_token(
    aiohttp_client: ClientFactory,
) -> None:
    app = build_demo_console()
    browser = await aiohttp_client(app)
    await log_in(browser, "alice")
    token = await session_token(browser)
    script = await aiohttp_client(app)  # no cookies: the token alone
    me = await script.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert await me.json() == {**DEMO_USERS[0].public(), "credential": "session"}
    reports = await script.get("/api/reports", headers={"Authorization": f"bearer {token}"})
    assert reports.status == 200
    await browser.post("/logout", allow_redirects=False)
    gone = await script.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert gone.status == 401


@pytest.mark.parametrize("token", ["", "u-alice", "demo-token-alice-x", "nope"])
async def test_unknown_bearer_tokens_are_refused(client: Client, token: str) -> None:
    await log_in(client)
    client.session.cookie_jar.clear()
    resp = await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 401


@pytest.mark.parametrize("path", ["/api/me", "/api/reports"])
async def test_anonymous_api_request_is_401_json(client: Client, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 401
    assert await resp.json() == {"error": "unauthenticated"}


async def test_forged_session_cookie_is_anonymous(client: Client) -> None:
    resp = await client.get("/api/me", cookies={SESSION_COOKIE: "u-alice"})
    assert resp.status == 401


async def test_api_reports_with_auth(client: Client) -> None:
    resp = await client.get("/api/reports", headers={"Authorization": "Bearer demo-token-dave"})
    assert resp.status == 200
    body = await resp.json()
    assert [r["id"] for r in body["reports"]] == ["r-1", "r-2", "r-3"]


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_logout_ends_the_session_server_side(client: Client, method: str) -> None:
    await log_in(client)
    token = client.session.cookie_jar.filter_cookies(client.make_url("/"))[SESSION_COOKIE].value
    resp = await client.request(method, "/logout", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/login"
    assert (await client.get("/api/me")).status == 401
    # Replaying the old cookie does not bring the session back.
    replay = await client.get("/api/me", cookies={SESSION_COOKIE: token})
    assert replay.status == 401


async def test_sessions_are_per_app(aiohttp_client: ClientFactory) -> None:
    first = await aiohttp_client(build_demo_console())
    second = await aiohttp_client(build_demo_console())
    await log_in(first)
    token = first.session.cookie_jar.filter_cookies(first.make_url("/"))[SESSION_COOKIE].value
    assert (await second.get("/api/me", cookies={SESSION_COOKIE: token})).status == 401


async def test_websocket_echoes_text_and_binary_with_subprotocol(client: Client) -> None:
    await log_in(client)
    async with client.ws_connect("/ws/echo", protocols=("other", "echo.v1")) as ws:
        assert ws.protocol == "echo.v1"
        await ws.send_str("hello")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "hello")
        await ws.send_bytes(b"\x00\xffbin")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\xffbin")


async def test_websocket_without_subprotocol_offer(client: Client) -> None:
    async with client.ws_connect(
        "/ws/echo", headers={"Authorization": "Bearer demo-token-bob"}
    ) as ws:
        assert ws.protocol is None
        await ws.send_str("plain")
        assert await ws.receive_str() == "plain"


async def test_websocket_refuses_anonymous_before_upgrade(client: Client) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as excinfo:
        await client.ws_connect("/ws/echo")
    assert excinfo.value.status == 401


async def test_static_css_and_healthz_need_no_login(client: Client) -> None:
    css = await client.get("/static/app.css")
    assert css.status == 200
    assert css.content_type == "text/css"
    assert "body" in await css.text()
    health = await client.get("/healthz")
    assert health.status == 200
    assert await health.text() == "ok"
