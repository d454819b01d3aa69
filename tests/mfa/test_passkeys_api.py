"""The passkey (WebAuthn) API end to end: a stub console, the whole sidecar app, a real SQLite
store, and a software authenticator where a browser would use a platform one.

Every case goes through HTTP the way the setup and verify pages do: CSRF token from
``/mfa/api/status``, options from a ``begin`` call, the authenticator's JSON to ``finish``.
A "browser" is a test client with its own cookie jar, signed in to the console; a second
browser for the same user is the same console login without the sidecar cookie.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cbor2
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from sidecar.app import METRICS, build_app
from sidecar.mfa import routes
from tests.conftest import deep_merge, make_config
from tests.mfa.softauthn import AT, UP, UV, SoftAuthenticator, b64url, from_b64url

RP_ID = "localhost"
ORIGIN = "http://localhost"

REGISTER_BEGIN = "/mfa/api/passkey/begin"
REGISTER_FINISH = "/mfa/api/passkey/finish"
VERIFY_BEGIN = "/mfa/api/verify/passkey/begin"
VERIFY_FINISH = "/mfa/api/verify/passkey/finish"

USERS = {
    "bob": {"id": "u-bob", "email": "bob@example.com", "role": "admin"},
    "carol": {"id": "u-carol", "email": "carol@example.com", "role": "member"},
}
HTML = {"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate"}

# MFA for everybody with no grace, so an unverified browser never reaches the console. The
# lockout is roomy because every test client is 127.0.0.1 (one per-IP counter): only the
# lockout test provokes enough failures to trip it.
BASE: dict[str, Any] = {
    "security": {"mfa_policy": "all", "grace_period": "0s"},
    "mfa": {"lockout": {"max_failures": 100}},
}
OPTIONAL = {"security": {"mfa_policy": "optional"}}

Client = TestClient[web.Request, web.Application]
Browser = Callable[[str], Awaitable[Client]]
Start = Callable[..., Awaitable[Browser]]


def stub_console() -> web.Application:
    app = web.Application()

    async def me(request: web.Request) -> web.Response:
        user = USERS.get(request.cookies.get("console", ""))
        if user is None:
            return web.json_response({"error": "unauthenticated"}, status=401)
        return web.json_response(user)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"console page {request.path}")

    app.router.add_get("/api/me", me)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


@pytest.fixture
async def console(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(stub_console())


@pytest.fixture
def start(
    tmp_path: Path,
    console: TestServer,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> Start:
    """``browser = await start(**config_sections)`` serves a sidecar in front of the stub
    console; ``await browser("carol")`` is a new browser signed in to the console as carol."""

    async def factory(**sections: Any) -> Browser:
        url = f"http://127.0.0.1:{console.port}"
        server = await aiohttp_server(
            build_app(make_config(tmp_path, url, **deep_merge(BASE, sections)))
        )

        async def browser(user: str) -> Client:
            client = await aiohttp_client(server)
            client.session.cookie_jar.update_cookies(
                {"console": user}, URL(str(client.make_url("/")))
            )
            return client

        return browser

    return factory


def soft(**settings: Any) -> SoftAuthenticator:
    return SoftAuthenticator(RP_ID, ORIGIN, **settings)


async def status(client: Client) -> dict[str, Any]:
    response = await client.get("/mfa/api/status")
    assert response.status == 200, await response.text()
    data: dict[str, Any] = await response.json()
    return data


async def call(
    client: Client, path: str, body: Any = None, *, method: str = "POST"
) -> ClientResponse:
    """A state-changing call as the pages make it: same origin, the session's CSRF token."""
    token = (await status(client))["csrf_token"]
    headers = {"X-CSRF-Token": token, "Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"}
    return await client.request(method, path, json=body, headers=headers)


async def options(client: Client, path: str) -> dict[str, Any]:
    response = await call(client, path)
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    data: dict[str, Any] = await response.json()
    return data


async def finish(client: Client, path: str, credential: Any, **extra: Any) -> ClientResponse:
    return await call(client, path, {"credential": credential, **extra})


async def error_of(response: ClientResponse) -> str:
    body: dict[str, Any] = await response.json()
    error: str = body["error"]
    return error


async def enroll(client: Client, authn: SoftAuthenticator, name: str = "Laptop") -> dict[str, Any]:
    """Register a passkey through begin/finish; the finish answer."""
    begun = await options(client, REGISTER_BEGIN)
    response = await finish(client, REGISTER_FINISH, authn.create(begun), name=name)
    assert response.status == 200, await response.text()
    data: dict[str, Any] = await response.json()
    return data


async def verify(client: Client, authn: SoftAuthenticator, **overrides: Any) -> ClientResponse:
    """Verify this browser with a passkey; ``overrides`` go to the authenticator."""
    begun = await options(client, VERIFY_BEGIN)
    return await finish(client, VERIFY_FINISH, authn.get(begun, **overrides))


async def console_page(client: Client) -> ClientResponse:
    """A top-level navigation to a console page through the sidecar."""
    return await client.get("/settings", headers=HTML, allow_redirects=False)


async def passes(client: Client) -> bool:
    response = await console_page(client)
    return response.status == 200 and await response.text() == "console page /settings"


def sidecar_cookie(client: Client) -> str:
    return client.session.cookie_jar.filter_cookies(client.make_url("/"))["sidecar_session"].value


def put_sidecar_cookie(client: Client, value: str) -> None:
    client.session.cookie_jar.update_cookies(
        {"sidecar_session": value}, URL(str(client.make_url("/")))
    )


def ids(descriptors: list[dict[str, Any]]) -> list[str]:
    return [d["id"] for d in descriptors]


# --- enrollment and verification ----------------------------------------------------------


async def test_enrollment_offers_a_discoverable_passkey_with_user_verification(
    start: Start,
) -> None:
    browser = await start()
    carol = await browser("carol")
    before = await console_page(carol)
    assert before.status == 303
    assert before.headers["Location"] == "/mfa/setup?next=/settings"
    nothing = await call(carol, VERIFY_BEGIN)
    assert nothing.status == 409
    assert await error_of(nothing) == "not_enrolled"  # and not counted as an attempt

    begun = await options(carol, REGISTER_BEGIN)
    assert begun["rp"]["id"] == RP_ID
    handle = from_b64url(begun["user"]["id"])
    assert len(handle) >= 16
    assert handle not in (b"u-carol", b"carol@example.com")
    assert begun["user"]["id"] not in ("u-carol", "carol@example.com")
    selection = begun["authenticatorSelection"]
    assert selection["userVerification"] == "required"
    assert selection["residentKey"] in ("preferred", "required")
    assert "authenticatorAttachment" not in selection
    assert {"type": "public-key", "alg": -7} in begun["pubKeyCredParams"]
    assert begun["excludeCredentials"] == []

    authn = soft()
    response = await finish(carol, REGISTER_FINISH, authn.create(begun), name="Work laptop")
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert len(body["recovery_codes"]) == 10
    assert len(set(body["recovery_codes"])) == 10
    assert body["verified"] is True

    after = await console_page(carol)
    assert after.status == 200
    assert await after.text() == "console page /settings"
    now = await status(carol)
    assert now["enrolled"] is True
    assert now["verified"] is True
    [passkey] = now["methods"]["passkeys"]
    assert passkey["id"] == b64url(authn.credentials[0].credential_id)
    assert passkey["name"] == "Work laptop"


async def test_a_new_browser_verifies_with_the_passkey(start: Start) -> None:
    browser = await start()
    authn = soft()
    await enroll(await browser("carol"), authn)

    other = await browser("carol")
    page = await console_page(other)
    assert page.status == 303
    assert page.headers["Location"] == "/mfa/verify?next=/settings"
    begun = await options(other, VERIFY_BEGIN)
    assert begun["rpId"] == RP_ID
    assert begun["userVerification"] == "required"
    assert ids(begun["allowCredentials"]) == [b64url(authn.credentials[0].credential_id)]
    response = await finish(other, VERIFY_FINISH, authn.get(begun))
    assert response.status == 200, await response.text()
    assert (await response.json())["verified"] is True
    assert await passes(other)
    [passkey] = (await status(other))["methods"]["passkeys"]
    assert passkey["last_used_at"] is not None


async def test_a_second_passkey_needs_a_recent_verification_and_excludes_the_first(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    browser = await start()
    first, second = soft(), soft()
    carol = await browser("carol")
    await enroll(carol, first)
    handle = first.credentials[0].user_handle

    unverified = await browser("carol")
    refused = await call(unverified, REGISTER_BEGIN)
    assert refused.status == 403
    assert await error_of(refused) == "step_up_required"

    # Verified, but 11 minutes ago: sensitive changes need a fresh verification.
    later = SimpleNamespace(time=lambda: time.time() + 11 * 60)
    monkeypatch.setattr(routes, "time", later)
    stale = await call(carol, REGISTER_BEGIN)
    assert stale.status == 403
    assert await error_of(stale) == "step_up_required"
    monkeypatch.undo()

    begun = await options(carol, REGISTER_BEGIN)
    assert ids(begun["excludeCredentials"]) == [b64url(first.credentials[0].credential_id)]
    assert from_b64url(begun["user"]["id"]) == handle  # one stable handle per user
    response = await finish(carol, REGISTER_FINISH, second.create(begun), name="Phone")
    assert response.status == 200, await response.text()
    assert (await response.json())["recovery_codes"] is None
    passkeys = (await status(carol))["methods"]["passkeys"]
    assert [p["name"] for p in passkeys] == ["Laptop", "Phone"]

    # Either passkey verifies a new browser.
    other = await browser("carol")
    begun = await options(other, VERIFY_BEGIN)
    assert len(begun["allowCredentials"]) == 2
    response = await finish(other, VERIFY_FINISH, second.get(begun))
    assert response.status == 200, await response.text()
    assert await passes(other)


# --- what the checks refuse ---------------------------------------------------------------

BAD_CEREMONIES = [
    pytest.param({"origin": "https://evil.example"}, id="another origin"),
    pytest.param({"origin": "https://localhost"}, id="another scheme"),
    pytest.param({"origin": "http://localhost:8080"}, id="another port"),
    pytest.param({"rp_id": "evil.example"}, id="rp id hash of another site"),
    pytest.param({"user_verified": False}, id="no user verification"),
]


@pytest.mark.parametrize("override", BAD_CEREMONIES)
async def test_a_bad_registration_is_refused(start: Start, override: dict[str, Any]) -> None:
    browser = await start()
    carol = await browser("carol")
    begun = await options(carol, REGISTER_BEGIN)
    response = await finish(carol, REGISTER_FINISH, soft().create(begun, **override))
    assert response.status == 400
    assert await error_of(response) == "passkey_failed"
    now = await status(carol)
    assert now["enrolled"] is False
    assert now["methods"]["passkeys"] == []
    assert (await console_page(carol)).status == 303


@pytest.mark.parametrize("override", BAD_CEREMONIES)
async def test_a_bad_assertion_is_refused(start: Start, override: dict[str, Any]) -> None:
    browser = await start()
    authn = soft()
    await enroll(await browser("carol"), authn)
    other = await browser("carol")
    response = await verify(other, authn, **override)
    assert response.status == 400
    assert await error_of(response) == "passkey_failed"
    assert (await status(other))["verified"] is False
    assert (await console_page(other)).status == 303


async def test_a_verification_assertion_works_once(start: Start) -> None:
    browser = await start()
    authn = soft(sign_count_step=0)  # so that only the challenge can stop the replay
    await enroll(await browser("carol"), authn)

    other = await browser("carol")
    begun = await options(other, VERIFY_BEGIN)
    cookie_with_challenge = sidecar_cookie(other)
    assertion = authn.get(begun)
    assert (await finish(other, VERIFY_FINISH, assertion)).status == 200
    assert (await finish(other, VERIFY_FINISH, assertion)).status == 400
    # The old cookie still names the challenge: single use is enforced by the server.
    put_sidecar_cookie(other, cookie_with_challenge)
    assert (await finish(other, VERIFY_FINISH, assertion)).status == 400
    # Nor does it verify another browser that has a challenge of its own.
    third = await browser("carol")
    await options(third, VERIFY_BEGIN)
    assert (await finish(third, VERIFY_FINISH, assertion)).status == 400
    assert (await console_page(third)).status == 303


async def test_a_registration_response_works_once(start: Start) -> None:
    browser = await start(**OPTIONAL)
    bob = await browser("bob")
    begun = await options(bob, REGISTER_BEGIN)
    cookie_with_challenge = sidecar_cookie(bob)
    created = soft().create(begun)
    assert (await finish(bob, REGISTER_FINISH, created)).status == 200
    assert (await finish(bob, REGISTER_FINISH, created)).status == 400
    put_sidecar_cookie(bob, cookie_with_challenge)
    # Refused either way: the old session is no longer stepped up (403), and its challenge
    # was used (400).
    assert (await finish(bob, REGISTER_FINISH, created)).status in (400, 403)
    assert len((await status(bob))["methods"]["passkeys"]) == 1


async def test_a_challenge_is_bound_to_the_session_that_asked_for_it(start: Start) -> None:
    browser = await start()
    authn = soft(sign_count_step=0)
    await enroll(await browser("carol"), authn)

    asking, other = await browser("carol"), await browser("carol")
    begun = await options(asking, VERIFY_BEGIN)
    # Another session without a ceremony of its own, then with one.
    assert (await finish(other, VERIFY_FINISH, authn.get(begun))).status == 400
    await options(other, VERIFY_BEGIN)
    assert (await finish(other, VERIFY_FINISH, authn.get(begun))).status == 400
    assert (await status(other))["verified"] is False
    # The session that asked can still finish with it.
    assert (await finish(asking, VERIFY_FINISH, authn.get(begun))).status == 200

    # Registration likewise (bob has no passkey yet, so no step-up is needed).
    bob_a, bob_b = await browser("bob"), await browser("bob")
    begun = await options(bob_a, REGISTER_BEGIN)
    await options(bob_b, REGISTER_BEGIN)
    assert (await finish(bob_b, REGISTER_FINISH, soft().create(begun))).status == 400
    assert (await status(bob_b))["methods"]["passkeys"] == []
    assert (await finish(bob_a, REGISTER_FINISH, soft().create(begun))).status == 200


async def test_a_sign_count_that_does_not_move_forward_is_refused(start: Start) -> None:
    browser = await start()
    authn = soft()
    await enroll(await browser("carol"), authn)

    results = []
    for count in (5, 3, 5, 0, 6, 2**32 - 1):
        response = await verify(await browser("carol"), authn, sign_count=count)
        results.append((count, response.status))
    assert results == [(5, 200), (3, 400), (5, 400), (0, 400), (6, 200), (2**32 - 1, 200)]


async def test_an_authenticator_that_never_counts_verifies_repeatedly(start: Start) -> None:
    browser = await start()
    authn = soft(sign_count_step=0)
    await enroll(await browser("carol"), authn)
    for _ in range(3):
        other = await browser("carol")
        response = await verify(other, authn)
        assert response.status == 200, await response.text()
        assert await passes(other)


async def test_another_users_passkey_does_not_verify(start: Start) -> None:
    browser = await start()
    bobs, carols = soft(), soft()
    await enroll(await browser("bob"), bobs)
    await enroll(await browser("carol"), carols)
    bob_id = bobs.credentials[0].credential_id
    bob_handle = bobs.credentials[0].user_handle
    carol_handle = carols.credentials[0].user_handle
    assert bob_handle != carol_handle

    attempts: list[tuple[SoftAuthenticator, dict[str, Any]]] = [
        (bobs, {"credential_id": bob_id}),  # bob's passkey, signed over carol's challenge
        (bobs, {"credential_id": bob_id, "user_handle": carol_handle}),  # ... claiming carol
        (carols, {"user_handle": bob_handle}),  # carol's passkey claiming bob's handle
    ]
    for authn, overrides in attempts:
        other = await browser("carol")
        response = await verify(other, authn, **overrides)
        assert response.status == 400, overrides
        assert (await status(other))["verified"] is False
        assert (await console_page(other)).status == 303


async def test_a_credential_id_already_registered_cannot_be_taken_over(start: Start) -> None:
    browser = await start(**OPTIONAL)
    carols = soft(sign_count_step=0)
    await enroll(await browser("carol"), carols)
    carol_id = carols.credentials[0].credential_id

    # Credential ids are not secret (allowCredentials shows them): bob registers his own key
    # under carol's id.
    bob = await browser("bob")
    begun = await options(bob, REGISTER_BEGIN)
    response = await finish(bob, REGISTER_FINISH, soft().create(begun, credential_id=carol_id))
    assert response.status == 400
    assert (await status(bob))["methods"]["passkeys"] == []
    assert (await verify(await browser("carol"), carols)).status == 200


async def test_a_registration_begun_before_enrollment_needs_step_up_to_finish_after(
    start: Start,
) -> None:
    browser = await start(**OPTIONAL)
    early, owner = await browser("bob"), await browser("bob")
    begun = await options(early, REGISTER_BEGIN)  # no method yet: no step-up asked
    await enroll(owner, soft())
    response = await finish(early, REGISTER_FINISH, soft().create(begun))
    assert response.status == 403
    assert await error_of(response) == "step_up_required"
    assert len((await status(owner))["methods"]["passkeys"]) == 1
    assert (await status(early))["verified"] is False


async def test_an_oversized_credential_id_is_refused(start: Start) -> None:
    browser = await start()
    carol = await browser("carol")
    begun = await options(carol, REGISTER_BEGIN)
    response = await finish(carol, REGISTER_FINISH, soft().create(begun, credential_id=bytes(1024)))
    assert response.status == 400
    assert (await status(carol))["methods"]["passkeys"] == []


# --- malformed input ----------------------------------------------------------------------


def _set(response_fields: dict[str, str], **top: Any) -> Callable[[dict[str, Any]], Any]:
    def mutate(credential: dict[str, Any]) -> Any:
        changed = {**credential, **top}
        changed["response"] = {**credential["response"], **response_fields}
        return changed

    return mutate


def _binary(value: str) -> Callable[[dict[str, Any]], Any]:
    """Every binary field but clientDataJSON set to ``value``."""

    def mutate(credential: dict[str, Any]) -> Any:
        fields = ("attestationObject", "authenticatorData", "signature", "userHandle")
        response = {k: (value if k in fields else v) for k, v in credential["response"].items()}
        return {**credential, "response": response}

    return mutate


def _client_data(data: Any) -> Callable[[dict[str, Any]], Any]:
    return _set({"clientDataJSON": b64url(json.dumps(data).encode())})


_cut_short = bytes(32) + bytes([UP | UV | AT]) + bytes(4) + bytes(16) + b"\x00\x40"

Mutation = Callable[[dict[str, Any]], Any]

# (what is wrong, how to make it so from a genuine credential)
MALFORMED_EITHER: list[tuple[str, Mutation]] = [
    ("credential missing", lambda c: None),
    ("credential is a string", lambda c: "garbage"),
    ("credential is a number", lambda c: 42),
    ("credential is a list", lambda c: [c]),
    ("credential is empty", lambda c: {}),
    ("credential is cut-off JSON text", lambda c: json.dumps(c)[:-5]),
    ("id not base64url", lambda c: {**c, "id": "a", "rawId": "a"}),
    ("id and rawId differ", lambda c: {**c, "rawId": b64url(b"x" * 32)}),
    ("wrong type", lambda c: {**c, "type": "password"}),
    ("response is a list", lambda c: {**c, "response": []}),
    ("clientDataJSON not base64url", _set({"clientDataJSON": "a"})),
    ("clientDataJSON not JSON", _set({"clientDataJSON": b64url(b"\xff{")})),
    ("clientDataJSON a list", _client_data([])),
    ("clientDataJSON empty", _client_data({})),
    ("clientDataJSON wrong types", _client_data({"type": 1, "challenge": 2, "origin": [3]})),
    (
        "clientDataJSON odd tokenBinding",
        _client_data({"type": "x", "challenge": "", "origin": "", "tokenBinding": {"status": []}}),
    ),
    ("binary fields not base64url", _binary("a")),
    ("binary fields empty", _binary("")),
    ("binary fields junk", _binary(b64url(b"\xff" * 40))),
    ("authenticator data cut short", _binary(b64url(_cut_short))),
]
MALFORMED_REGISTRATIONS = [
    *MALFORMED_EITHER,
    (
        "attestation without authData",
        _set({"attestationObject": b64url(cbor2.dumps({"fmt": "none", "attStmt": {}}))}),
    ),
    ("attestation a CBOR list", _set({"attestationObject": b64url(cbor2.dumps([1, 2]))})),
    (
        "attestation with a statement",
        lambda c: _set({"attestationObject": _with_statement(c)})(c),
    ),
]
MALFORMED_ASSERTIONS = [
    *MALFORMED_EITHER,
    ("signature not DER", _set({"signature": b64url(b"\x30" + bytes(70))})),
    ("userHandle not base64url", _set({"userHandle": "a"})),
]


def _with_statement(credential: dict[str, Any]) -> str:
    """The genuine attestation object claiming format "none" with a non-empty statement."""
    attestation = cbor2.loads(from_b64url(credential["response"]["attestationObject"]))
    return b64url(cbor2.dumps({**attestation, "attStmt": {"sig": b"x"}}))


async def test_malformed_registrations_are_refused_cleanly(start: Start) -> None:
    browser = await start()
    bob = await browser("bob")
    outcomes = []
    for label, mutate in MALFORMED_REGISTRATIONS:
        begun = await options(bob, REGISTER_BEGIN)
        response = await finish(bob, REGISTER_FINISH, mutate(soft().create(begun)))
        outcomes.append((label, response.status))
    assert outcomes == [(label, 400) for label, _ in MALFORMED_REGISTRATIONS]
    assert (await status(bob))["methods"]["passkeys"] == []
    assert (await console_page(bob)).status == 303


async def test_malformed_assertions_are_refused_cleanly(start: Start) -> None:
    browser = await start()
    authn = soft(sign_count_step=0)
    await enroll(await browser("carol"), authn)
    carol = await browser("carol")
    outcomes = []
    for label, mutate in MALFORMED_ASSERTIONS:
        begun = await options(carol, VERIFY_BEGIN)
        response = await finish(carol, VERIFY_FINISH, mutate(authn.get(begun)))
        outcomes.append((label, response.status))
    assert outcomes == [(label, 400) for label, _ in MALFORMED_ASSERTIONS]
    assert (await status(carol))["verified"] is False
    assert (await verify(carol, authn)).status == 200  # the genuine one still works


BAD_BODIES = {
    "not JSON": b"{not json",
    "not UTF-8": b"\xff\xfe\x00",
    "a JSON array": b"[1, 2]",
    "a JSON string": b'"credential"',
    "empty": b"",
}


async def test_bodies_that_are_not_a_json_object_never_cause_a_server_error(
    start: Start,
) -> None:
    browser = await start()
    await enroll(await browser("carol"), soft())
    bob, carol = await browser("bob"), await browser("carol")
    outcomes = []
    for label, body in BAD_BODIES.items():
        for client, path in (
            (bob, REGISTER_BEGIN),
            (bob, REGISTER_FINISH),
            (carol, VERIFY_BEGIN),
            (carol, VERIFY_FINISH),
        ):
            token = (await status(client))["csrf_token"]
            response = await client.post(
                path,
                data=body,
                headers={"X-CSRF-Token": token, "Content-Type": "application/json"},
            )
            outcomes.append((label, path, response.status))
    # The begin calls take no body: ignoring it is as good as refusing it. The finish calls
    # follow a begin (the one just before) so that the body, not a missing ceremony, is what
    # they refuse.
    expected = [
        (label, path, 200 if path.endswith("begin") else 400)
        for label in BAD_BODIES
        for path in (REGISTER_BEGIN, REGISTER_FINISH, VERIFY_BEGIN, VERIFY_FINISH)
    ]
    assert outcomes == expected
    assert (await status(carol))["verified"] is False


# --- lockout, removal ---------------------------------------------------------------------


async def test_passkey_failures_count_towards_the_lockout(start: Start) -> None:
    browser = await start(mfa={"lockout": {"max_failures": 3}})
    authn = soft(sign_count_step=0)
    await enroll(await browser("carol"), authn)

    attacker, owner = await browser("carol"), await browser("carol")
    statuses = [(await verify(attacker, authn, user_verified=False)).status for _ in range(2)]
    pending = await options(owner, VERIFY_BEGIN)  # a ceremony started before the lockout
    statuses.append((await verify(attacker, authn, user_verified=False)).status)
    assert statuses == [400, 400, 429]

    locked_begin = await call(attacker, VERIFY_BEGIN)
    assert locked_begin.status == 429
    body = await locked_begin.json()
    assert body["error"] == "locked_out"
    assert body["locked_until"]
    # Even a correct assertion is refused while locked out.
    correct = await finish(owner, VERIFY_FINISH, authn.get(pending))
    assert correct.status == 429
    assert (await console_page(owner)).status == 303


async def test_removing_a_passkey_needs_a_recent_verification(start: Start) -> None:
    browser = await start()
    first, second = soft(sign_count_step=0), soft(sign_count_step=0)
    carol = await browser("carol")
    await enroll(carol, first)
    await enroll(carol, second, name="Phone")
    first_id = b64url(first.credentials[0].credential_id)

    elsewhere = await browser("carol")
    assert (await call(elsewhere, f"/mfa/api/passkeys/{first_id}", method="DELETE")).status == 403
    no_csrf = await carol.delete(f"/mfa/api/passkeys/{first_id}")
    assert no_csrf.status == 403
    assert await error_of(no_csrf) == "csrf"

    bob = await browser("bob")
    await enroll(bob, soft())
    bob_passkey = (await status(bob))["methods"]["passkeys"][0]["id"]
    for unknown in (bob_passkey, b64url(b"nope" * 8), "not-base64!"):
        response = await call(carol, f"/mfa/api/passkeys/{unknown}", method="DELETE")
        assert response.status == 404, unknown
    assert len((await status(bob))["methods"]["passkeys"]) == 1

    assert (await verify(elsewhere, second)).status == 200
    removed = await call(elsewhere, f"/mfa/api/passkeys/{first_id}", method="DELETE")
    assert removed.status == 200, await removed.text()
    passkeys = (await status(elsewhere))["methods"]["passkeys"]
    assert [p["name"] for p in passkeys] == ["Phone"]
    assert await passes(elsewhere)
    # Removing a method ends the verified sessions of other browsers.
    assert (await console_page(carol)).status == 303


async def test_the_last_passkey_stays_while_the_organization_requires_mfa(start: Start) -> None:
    browser = await start()
    authn = soft()
    carol = await browser("carol")
    await enroll(carol, authn)
    only = b64url(authn.credentials[0].credential_id)
    for query in ("", "?confirm=true"):
        response = await call(carol, f"/mfa/api/passkeys/{only}{query}", method="DELETE")
        assert response.status == 409
        assert await error_of(response) == "last_method"
    assert len((await status(carol))["methods"]["passkeys"]) == 1


async def test_removing_the_last_passkey_under_an_optional_policy_needs_confirmation(
    start: Start,
) -> None:
    browser = await start(**OPTIONAL)
    authn = soft()
    carol = await browser("carol")
    await enroll(carol, authn)
    only = b64url(authn.credentials[0].credential_id)
    unconfirmed = await call(carol, f"/mfa/api/passkeys/{only}", method="DELETE")
    assert unconfirmed.status == 409
    assert await error_of(unconfirmed) == "confirm_required"
    confirmed = await call(carol, f"/mfa/api/passkeys/{only}?confirm=true", method="DELETE")
    assert confirmed.status == 200, await confirmed.text()
    now = await status(carol)
    assert now["enrolled"] is False
    assert now["methods"]["passkeys"] == []


# --- what operators see -------------------------------------------------------------------


async def test_metrics_and_audit_record_passkey_use_without_key_material(
    start: Start, tmp_path: Path
) -> None:
    browser = await start()
    carol = await browser("carol")
    registry = carol.app[METRICS].registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    enrollments = ("sidecar_mfa_enrollments_total", {"method": "passkey"})
    successes = ("sidecar_mfa_verifications_total", {"method": "passkey", "result": "success"})
    failures = ("sidecar_mfa_verifications_total", {"method": "passkey", "result": "failure"})
    assert [sample(n, **labels) for n, labels in (enrollments, successes, failures)] == [0, 0, 0]

    authn = soft()
    await enroll(carol, authn)
    assert (await verify(await browser("carol"), authn)).status == 200
    assert (
        await verify(await browser("carol"), authn, origin="https://evil.example")
    ).status == 400
    assert [sample(n, **labels) for n, labels in (enrollments, successes, failures)] == [1, 1, 1]

    text = (tmp_path / "audit.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    [enrolled] = [r for r in records if r["action"] == "mfa.enrolled"]
    assert enrolled["details"]["method"] == "passkey"
    assert enrolled["actor"] == "u-carol"
    verifications = [
        (r["outcome"], r["details"]["method"]) for r in records if r["action"] == "mfa.verify"
    ]
    assert verifications == [("success", "passkey"), ("failure", "passkey")]

    credential = authn.credentials[0]
    public = credential.private_key.public_key().public_numbers()
    material = []
    for raw in (credential.credential_id, public.x.to_bytes(32), public.y.to_bytes(32)):
        material += [b64url(raw), base64.b64encode(raw).decode().rstrip("="), raw.hex()]
    for value in material:
        assert value not in text


async def test_logs_never_carry_a_full_credential_id(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    browser = await start(**OPTIONAL)
    authn = soft()
    carol = await browser("carol")
    await enroll(carol, authn)
    assert (await verify(await browser("carol"), authn)).status == 200
    credential_id = b64url(authn.credentials[0].credential_id)
    removed = await call(carol, f"/mfa/api/passkeys/{credential_id}?confirm=true", method="DELETE")
    assert removed.status == 200
    ours = [r for r in caplog.records if r.name.startswith("sidecar")]
    assert ours
    # Structured fields travel in the record's attributes, not only in its message.
    assert not [r.__dict__ for r in ours if credential_id in repr(r.__dict__)]
