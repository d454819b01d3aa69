"""The sidecar's session cookie: flags, key rotation, expiry, bad cookies, and when a session
counts as verified. Driven through a tiny aiohttp app with aiohttp-session's middleware, the
way the sidecar uses the storage; the cookie is carried by hand so each step is explicit."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import TestClient
from aiohttp_session import get_session, session_middleware
from cryptography.fernet import Fernet, InvalidToken

from sidecar.mfa.session import (
    RotatingCookieStorage,
    SessionView,
    mark_verified,
    session_for,
    session_id,
    view,
)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]

COOKIE = "sidecar_session"
VERIFY_EVERY = 12 * 3600
KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()


def session_app(
    keys: list[str], *, secure: bool = False, max_age: int = VERIFY_EVERY
) -> web.Application:
    storage = RotatingCookieStorage(keys, cookie_name=COOKIE, max_age=max_age, secure=secure)
    app = web.Application(middlewares=[session_middleware(storage)])

    async def login(request: web.Request) -> web.Response:
        session = await get_session(request)
        session["uid"] = request.match_info["user"]
        return web.Response(text="ok")

    async def whoami(request: web.Request) -> web.Response:
        session = await get_session(request)
        return web.json_response({"uid": session.get("uid"), "new": session.new})

    async def enter(request: web.Request) -> web.Response:
        # What the MFA gate does on every request of a console user.
        session = await session_for(
            request, user=request.query["user"], binding=request.query["binding"]
        )
        return web.json_response({"sid": session_id(session)})

    async def verify(request: web.Request) -> web.Response:
        session = await mark_verified(
            request, user=request.query["user"], binding=request.query["binding"], generation=3
        )
        return web.json_response({"sid": session_id(session)})

    async def verified(request: web.Request) -> web.Response:
        current = view(await get_session(request))
        ok = current.verified_for(
            user=request.query["user"],
            binding=request.query["binding"],
            generation=int(request.query.get("generation", "3")),
            now=time.time(),
            verify_every=VERIFY_EVERY,
        )
        return web.json_response({"verified": ok})

    async def plant(request: web.Request) -> web.Response:
        session = await get_session(request)
        session["planted"] = "by someone else"
        return web.Response(text="ok")

    async def planted(request: web.Request) -> web.Response:
        session = await get_session(request)
        return web.json_response({"planted": session.get("planted")})

    app.router.add_get("/login/{user}", login)
    app.router.add_get("/plant", plant)
    app.router.add_get("/planted", planted)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/enter", enter)
    app.router.add_get("/verify", verify)
    app.router.add_get("/verified", verified)
    return app


async def client_for(aiohttp_client: ClientFactory, app: web.Application) -> Client:
    # No cookie jar: every test says which cookie it sends.
    return await aiohttp_client(app, cookie_jar=DummyCookieJar())


def sent_cookie(response: Any) -> str:
    value: str = response.cookies[COOKIE].value
    return value


async def whoami(client: Client, cookie: str | None) -> dict[str, Any]:
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie is not None else {}
    async with client.get("/whoami", headers=headers) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def login(client: Client, user: str, cookie: str | None = None) -> str:
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie is not None else {}
    async with client.get(f"/login/{user}", headers=headers) as response:
        assert response.status == 200
        return sent_cookie(response)


# --- cookie flags ------------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "localhost without Secure"])
async def test_cookie_flags(aiohttp_client: ClientFactory, secure: bool) -> None:
    client = await client_for(aiohttp_client, session_app([KEY_A], secure=secure))
    async with client.get("/login/alice") as response:
        [header] = [h for h in response.headers.getall("Set-Cookie") if h.startswith(COOKIE)]
    attributes = {part.strip().split("=")[0].lower(): part for part in header.split(";")[1:]}
    assert "httponly" in attributes
    assert attributes["samesite"].strip().lower() == "samesite=lax"
    assert attributes["max-age"].strip().lower() == f"max-age={VERIFY_EVERY}"
    assert attributes["path"].strip() == "Path=/"
    assert ("secure" in attributes) is secure


async def test_session_round_trip(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, session_app([KEY_A]))
    cookie = await login(client, "alice")
    assert "alice" not in cookie  # encrypted, not merely signed
    assert await whoami(client, cookie) == {"uid": "alice", "new": False}


# --- key rotation ------------------------------------------------------------------------------


async def test_rotation_reads_old_cookies_and_writes_with_the_new_key(
    aiohttp_client: ClientFactory,
) -> None:
    before = await client_for(aiohttp_client, session_app([KEY_A]))
    rotated = await client_for(aiohttp_client, session_app([KEY_B, KEY_A]))

    old_cookie = await login(before, "alice")
    # Nobody is logged out by the rotation.
    assert await whoami(rotated, old_cookie) == {"uid": "alice", "new": False}

    new_cookie = await login(rotated, "bob", old_cookie)
    payload = json.loads(Fernet(KEY_B.encode()).decrypt(new_cookie.encode()))
    assert payload["session"]["uid"] == "bob"
    with pytest.raises(InvalidToken):
        Fernet(KEY_A.encode()).decrypt(new_cookie.encode())


async def test_retired_key_no_longer_reads_cookies(aiohttp_client: ClientFactory) -> None:
    before = await client_for(aiohttp_client, session_app([KEY_A]))
    after = await client_for(aiohttp_client, session_app([KEY_B]))
    old_cookie = await login(before, "alice")
    assert await whoami(after, old_cookie) == {"uid": None, "new": True}


# --- bad cookies -------------------------------------------------------------------------------


def _encrypted(payload: bytes, key: str = KEY_A) -> str:
    return Fernet(key.encode()).encrypt(payload).decode()


def _session_json(**data: Any) -> bytes:
    return json.dumps({"created": int(time.time()), "session": data}).encode()


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param("", id="empty"),
        pytest.param("garbage", id="garbage"),
        pytest.param("gAAAAA", id="truncated token"),
        pytest.param("%%%", id="percent signs"),
        pytest.param("eyJzZXNzaW9uIjp7InVpZCI6ImFsaWNlIn19", id="unencrypted base64 JSON"),
        pytest.param(_encrypted(_session_json(uid="alice"), KEY_B), id="another key"),
        pytest.param(_encrypted(b"\xff\xfe\x00"), id="right key, not UTF-8"),
        pytest.param(_encrypted(b"not json"), id="right key, not JSON"),
        pytest.param(_encrypted(b"[1, 2]"), id="right key, JSON list"),
        pytest.param(_encrypted(b'{"session": "alice"}'), id="right key, session not a dict"),
        pytest.param(_encrypted(b'{"uid": "alice"}'), id="right key, no session"),
    ],
)
async def test_bad_cookies_give_a_new_empty_session(
    aiohttp_client: ClientFactory, cookie: str
) -> None:
    client = await client_for(aiohttp_client, session_app([KEY_A]))
    assert await whoami(client, cookie) == {"uid": None, "new": True}


# Positions inside the header, IV, ciphertext and HMAC: never base64 padding bits.
@pytest.mark.parametrize("position", [3, 10, 40, -30, -20], ids=lambda p: f"char {p}")
async def test_tampered_cookie_gives_a_new_empty_session(
    aiohttp_client: ClientFactory, position: int
) -> None:
    client = await client_for(aiohttp_client, session_app([KEY_A]))
    cookie = await login(client, "alice")
    flipped = "A" if cookie[position] != "A" else "B"
    tampered = cookie[:position] + flipped + cookie[position:][1:]
    assert tampered != cookie
    assert await whoami(client, tampered) == {"uid": None, "new": True}


async def test_well_formed_forged_cookie_with_the_right_key_is_read(
    aiohttp_client: ClientFactory,
) -> None:
    """The control for the "right key" rows above: only their payloads are wrong."""
    client = await client_for(aiohttp_client, session_app([KEY_A]))
    cookie = _encrypted(_session_json(uid="alice"))
    assert await whoami(client, cookie) == {"uid": "alice", "new": False}


# --- expiry ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "alive"),
    [
        pytest.param(5, True, id="5 s old, max_age 60: read"),
        pytest.param(50, True, id="50 s old, max_age 60: read"),
        pytest.param(70, False, id="70 s old, max_age 60: expired"),
        pytest.param(3600, False, id="an hour old, max_age 60: expired"),
    ],
)
async def test_cookie_expires_by_its_encryption_time(
    aiohttp_client: ClientFactory, age: int, alive: bool
) -> None:
    """The Fernet timestamp decides, not the "created" field inside (which is current here):
    a stolen cookie cannot be kept alive past max_age by the client."""
    client = await client_for(aiohttp_client, session_app([KEY_A], max_age=60))
    token = Fernet(KEY_A.encode()).encrypt_at_time(
        _session_json(uid="alice"), current_time=int(time.time()) - age
    )
    expected = {"uid": "alice", "new": False} if alive else {"uid": None, "new": True}
    assert await whoami(client, token.decode()) == expected


# --- verification ------------------------------------------------------------------------------

VERIFIED_AT = 1_700_000_000.0
ALICE = SessionView(
    user="u-alice", binding="cred-1", verified_at=VERIFIED_AT, generation=3, grace_shown=False
)


@pytest.mark.parametrize(
    ("session", "user", "binding", "generation", "elapsed", "verified"),
    [
        pytest.param(ALICE, "u-alice", "cred-1", 3, 60, True, id="same user, binding, gen"),
        pytest.param(ALICE, "u-bob", "cred-1", 3, 60, False, id="other user"),
        pytest.param(ALICE, "u-alice", "cred-2", 3, 60, False, id="other console login"),
        pytest.param(ALICE, "u-alice", "cred-1", 4, 60, False, id="MFA reset since"),
        pytest.param(ALICE, "u-alice", "cred-1", 3, VERIFY_EVERY - 1, True, id="just in time"),
        pytest.param(ALICE, "u-alice", "cred-1", 3, VERIFY_EVERY, False, id="verify_every over"),
        pytest.param(ALICE, "u-alice", "cred-1", 3, 10 * VERIFY_EVERY, False, id="long expired"),
        pytest.param(
            SessionView("u-alice", "cred-1", None, 3, False),
            "u-alice",
            "cred-1",
            3,
            60,
            False,
            id="never verified",
        ),
        pytest.param(
            SessionView(None, None, None, None, False),
            "u-alice",
            "cred-1",
            3,
            60,
            False,
            id="fresh session",
        ),
    ],
)
def test_verified_for(
    session: SessionView, user: str, binding: str, generation: int, elapsed: float, verified: bool
) -> None:
    result = session.verified_for(
        user=user,
        binding=binding,
        generation=generation,
        now=VERIFIED_AT + elapsed,
        verify_every=VERIFY_EVERY,
    )
    assert result is verified


async def _get(client: Client, path: str, cookie: str | None) -> tuple[dict[str, Any], str | None]:
    """GET ``path``; the JSON body and the cookie to send next (the new one if any)."""
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie is not None else {}
    async with client.get(path, headers=headers) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        if COOKIE in response.cookies:
            cookie = sent_cookie(response)
        return body, cookie


async def test_verification_is_recorded_and_renews_the_session(
    aiohttp_client: ClientFactory,
) -> None:
    client = await client_for(aiohttp_client, session_app([KEY_A]))
    alice = "user=u-alice&binding=cred-1"

    before, cookie = await _get(client, f"/enter?{alice}", None)
    assert (await _get(client, f"/verified?{alice}", cookie))[0] == {"verified": False}

    after, cookie = await _get(client, f"/verify?{alice}", cookie)
    # A new session id on verification: a planted session is not upgraded (no fixation).
    assert after["sid"] != before["sid"]
    assert (await _get(client, f"/verified?{alice}", cookie))[0] == {"verified": True}
    assert (await _get(client, f"/verified?{alice}&generation=4", cookie))[0] == {"verified": False}

    # The same user, still verified, keeps the session on the next request.
    again, cookie = await _get(client, f"/enter?{alice}", cookie)
    assert again["sid"] == after["sid"]
    assert (await _get(client, f"/verified?{alice}", cookie))[0] == {"verified": True}


@pytest.mark.parametrize(
    "other",
    [
        pytest.param("user=u-bob&binding=cred-1", id="another user"),
        pytest.param("user=u-alice&binding=cred-2", id="another console login"),
    ],
)
async def test_another_login_does_not_inherit_a_verification(
    aiohttp_client: ClientFactory, other: str
) -> None:
    client = await client_for(aiohttp_client, session_app([KEY_A]))
    alice = "user=u-alice&binding=cred-1"
    _, cookie = await _get(client, f"/verify?{alice}", None)

    _, cookie = await _get(client, f"/enter?{other}", cookie)
    assert (await _get(client, f"/verified?{other}", cookie))[0] == {"verified": False}
    # ...and the session was reset, so going back does not revive Alice's verification.
    assert (await _get(client, f"/verified?{alice}", cookie))[0] == {"verified": False}


async def test_verification_starts_from_a_fresh_session(aiohttp_client: ClientFactory) -> None:
    """Nothing put into a session before verification survives it (no fixation)."""
    client = await client_for(aiohttp_client, session_app([KEY_A]))
    async with client.get("/plant") as response:
        cookie: str | None = sent_cookie(response)
    assert (await _get(client, "/planted", cookie))[0] == {"planted": "by someone else"}
    _, cookie = await _get(client, "/verify?user=u-alice&binding=cred-1", cookie)
    assert (await _get(client, "/planted", cookie))[0] == {"planted": None}
