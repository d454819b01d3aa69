"""Attacks on the MFA boundary, as an outsider with a console session and as a logged-in
member would try them, each on SQLite and on PostgreSQL (replicas where they matter).

Covered: finishing an authenticator-app enrollment behind the user's back; concurrency
against the lockout; one member locking colleagues out; look-alike user ids; refused admin
actions leaving no trace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.app import METRICS, MFA
from sidecar.mfa.service import Actor, MfaService
from tests.mfa.attack import Browser, Client, Org, OrgFactory, gather_responses, org_factory
from tests.mfa.softauthn import SoftAuthenticator
from tests.store.support import StoreKind

RP_ID, ORIGIN = "localhost", "http://localhost"
OFFICE = "203.0.113.50"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
async def make_org(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> AsyncIterator[OrgFactory]:
    kind: StoreKind = request.param
    async with AsyncExitStack() as stack:
        yield await org_factory(stack, kind, tmp_path, aiohttp_server, aiohttp_client)


def wrong(code: str) -> str:
    """A 6-digit code that is not ``code`` (nor its neighbours' codes, usually)."""
    return f"{(int(code) + 500_000) % 1_000_000:06d}"


def advance(org: Org, minutes: float) -> None:
    """Move every replica's MFA clock forward (pending secrets, lockout windows)."""
    for server in org.servers:
        service = server.app[MFA]
        clock: Callable[[], datetime] = service._clock

        def later(clock: Callable[[], datetime] = clock) -> datetime:
            return clock() + timedelta(minutes=minutes)

        service._clock = later


# --- 1. authenticator-app enrollment cannot be finished behind the user's back ------------


async def test_a_pending_secret_belongs_to_the_session_that_began_it(make_org: OrgFactory) -> None:
    org = await make_org()
    org.add_user("carol", "u-carol")
    attacker = await org.browser("carol", address="192.0.2.66")
    victim = await org.browser("carol")
    begun = await attacker.call("/mfa/api/totp/begin")
    secret = (await begun.json())["secret"]
    # The same console user in another browser cannot finish the attacker's setup...
    refused = await victim.call("/mfa/api/totp/finish", {"code": pyotp.TOTP(secret).now()})
    assert refused.status == 409
    assert (await refused.json())["error"] == "enrollment_expired"
    assert not (await victim.status())["enrolled"]


async def test_a_pending_secret_expires(make_org: OrgFactory) -> None:
    org = await make_org()
    org.add_user("carol", "u-carol")
    carol = await org.browser("carol")
    secret = (await (await carol.call("/mfa/api/totp/begin")).json())["secret"]
    advance(org, 11)
    late = await carol.call(
        "/mfa/api/totp/finish", {"code": pyotp.TOTP(secret).at(org.servers[0].app[MFA].now())}
    )
    assert late.status == 409
    assert (await late.json())["error"] == "enrollment_expired"


async def test_finishing_after_the_account_enrolled_elsewhere_needs_step_up(
    make_org: OrgFactory,
) -> None:
    org = await make_org()
    org.add_user("carol", "u-carol")
    old_tab = await org.browser("carol")
    secret = (await (await old_tab.call("/mfa/api/totp/begin")).json())["secret"]
    # Meanwhile a passkey is enrolled (in another browser): the pending secret is void.
    other = await org.browser("carol")
    assert (await other.enroll_passkey(SoftAuthenticator(RP_ID, ORIGIN))).status == 200
    finish = await old_tab.call("/mfa/api/totp/finish", {"code": pyotp.TOTP(secret).now()})
    assert finish.status == 403
    assert (await finish.json())["error"] == "step_up_required"
    state = await org.stores[0].mfa.state("u-carol")
    assert (state.totp, state.passkeys) == (False, 1)


async def test_a_reset_discards_a_pending_secret(make_org: OrgFactory) -> None:
    org = await make_org()
    org.add_user("carol", "u-carol")
    carol = await org.browser("carol")
    secret = (await (await carol.call("/mfa/api/totp/begin")).json())["secret"]
    await org.servers[0].app[MFA].reset("u-carol", Actor("cli", None))
    finish = await carol.call("/mfa/api/totp/finish", {"code": pyotp.TOTP(secret).now()})
    assert finish.status == 409
    assert not (await carol.status())["enrolled"]


async def test_wrong_codes_at_enrollment_are_counted_and_audited(make_org: OrgFactory) -> None:
    org = await make_org(mfa={"lockout": {"max_failures": 3}})
    org.add_user("carol", "u-carol")
    carol = await org.browser("carol")
    secret = (await (await carol.call("/mfa/api/totp/begin")).json())["secret"]
    code = pyotp.TOTP(secret).now()
    for left in (2, 1):
        answer = await carol.call("/mfa/api/totp/finish", {"code": wrong(code)})
        assert answer.status == 400
        assert (await answer.json())["attempts_left"] == left
    locked = await carol.call("/mfa/api/totp/finish", {"code": wrong(code)})
    assert locked.status == 429  # the third wrong code used the last attempt
    again = await carol.call("/mfa/api/totp/finish", {"code": code})
    assert again.status == 429  # even the right code is not checked now
    assert "Retry-After" in again.headers
    failures = [r for r in org.audit("mfa.enrolled") if r["outcome"] == "failure"]
    assert len(failures) == 3
    assert len(org.audit("mfa.lockout")) == 1


# --- 2. the lockout is atomic -----------------------------------------------------------


async def test_hundreds_of_concurrent_wrong_codes_get_max_failures_checks(
    make_org: OrgFactory,
) -> None:
    org = await make_org(replicas=2)
    org.add_user("carol", "u-carol")
    carol = await org.browser("carol")
    secret, _ = await carol.enroll_totp()
    token = (await carol.status())["csrf_token"]
    code = pyotp.TOTP(secret).now()
    # The attacker's browsers on both replicas, sharing the session cookie.
    other = await org.browser("carol", replica=1)
    other.client.session.cookie_jar.update_cookies(
        carol.client.session.cookie_jar.filter_cookies(carol.client.make_url("/"))
    )
    calls = [
        (carol, other)[i % 2].call("/mfa/api/verify/totp", {"code": wrong(code)}, csrf=token)
        for i in range(300)
    ]
    calls.insert(150, carol.call("/mfa/api/verify/totp", {"code": code}, csrf=token))
    results = await gather_responses(calls)
    checked_wrong = [b for s, b in results if s == 400]
    verified = [b for s, b in results if s == 200]
    assert len(checked_wrong) + len(verified) <= 5
    # 429: locked out, or over the per-user limit of concurrent sidecar calls (which keeps a
    # burst from one user off the store's connection pool).
    assert {s for s, _ in results} <= {200, 400, 429}
    assert len([r for r in org.audit("mfa.verify") if r["outcome"] == "failure"]) <= 5
    if not verified:  # the right code came after the limit: it was never checked
        after = await carol.call("/mfa/api/verify/totp", {"code": code}, csrf=token)
        assert after.status == 429


async def test_concurrent_recovery_code_guesses_are_bounded(make_org: OrgFactory) -> None:
    org = await make_org()
    org.add_user("carol", "u-carol")
    carol = await org.browser("carol")
    _, codes = await carol.enroll_totp()
    assert codes is not None
    token = (await carol.status())["csrf_token"]
    results = await gather_responses(
        [
            carol.call("/mfa/api/verify/recovery", {"code": f"AAAAA-{i:05d}"}, csrf=token)
            for i in range(60)
        ]
    )
    # Five were checked: four answered "wrong", the fifth "locked" (it used the last attempt).
    assert sum(s == 400 for s, _ in results) == 4
    assert sum(s == 429 for s, _ in results) == 56
    assert len([r for r in org.audit("mfa.verify") if r["outcome"] == "failure"]) == 5
    # One real code, used concurrently, works once (and not now: locked).
    assert (
        await carol.call("/mfa/api/verify/recovery", {"code": codes[0]}, csrf=token)
    ).status == 429


async def test_concurrent_bad_passkey_assertions_are_bounded(make_org: OrgFactory) -> None:
    org = await make_org()
    org.add_user("carol", "u-carol")
    carol = await org.browser("carol")
    authn = SoftAuthenticator(RP_ID, ORIGIN)
    assert (await carol.enroll_passkey(authn)).status == 200
    token = (await carol.status())["csrf_token"]

    async def bad_assertion() -> Any:
        begun = await carol.call("/mfa/api/verify/passkey/begin", csrf=token)
        if begun.status != 200:
            return begun
        # An assertion for another origin (a phishing site relaying the ceremony).
        forged = authn.get(await begun.json(), origin="https://evil.example")
        return await carol.call(
            "/mfa/api/verify/passkey/finish", {"credential": forged}, csrf=token
        )

    results = await gather_responses([bad_assertion() for _ in range(30)])
    assert sum(s == 400 for s, _ in results) <= 5
    assert all(s in (400, 429) for s, _ in results)
    assert len([r for r in org.audit("mfa.verify") if r["outcome"] == "failure"]) <= 5


# --- 3. one member cannot lock out others ------------------------------------------------


async def test_attempts_against_a_method_the_user_lacks_are_refused_and_not_counted(
    make_org: OrgFactory,
) -> None:
    org = await make_org(mfa={"lockout": {"max_failures": 2, "max_failures_per_address": 3}})
    org.add_user("mallory", "u-mallory")
    org.add_user("kate", "u-kate")
    kate = await org.browser("kate", address=OFFICE)
    secret, _ = await kate.enroll_totp()
    mallory = await org.browser("mallory", address=OFFICE)
    for _ in range(20):
        for path in ("/mfa/api/verify/totp", "/mfa/api/verify/recovery"):
            answer = await mallory.call(path, {"code": "123456"})
            assert answer.status == 409
            assert (await answer.json())["error"] == "not_enrolled"
    # Nothing was counted against the office address: kate verifies.
    kate_again = await org.browser("kate", address=OFFICE)
    ok = await kate_again.call("/mfa/api/verify/totp", {"code": _next(secret)})
    assert ok.status == 200, await ok.text()


def _next(secret: str) -> str:
    """The next time step's code: valid (window 1) and never used before."""
    return pyotp.TOTP(secret).at(time.time() + 30)


async def test_a_colleagues_mistakes_never_lock_a_user_out_of_the_shared_address(
    make_org: OrgFactory,
) -> None:
    org = await make_org()  # defaults: 5 per user, 50 per address
    org.add_user("mallory", "u-mallory")
    org.add_user("kate", "u-kate")
    mallory = await org.browser("mallory", address=OFFICE)
    await mallory.enroll_totp()
    kate = await org.browser("kate", address=OFFICE)
    kate_secret, _ = await kate.enroll_totp()
    token = (await mallory.status())["csrf_token"]
    for _ in range(8):  # mallory locks herself out
        await mallory.call("/mfa/api/verify/totp", {"code": "000000"}, csrf=token)
    locked = await mallory.call("/mfa/api/verify/totp", {"code": "000000"}, csrf=token)
    assert (await locked.json())["locked_by"] == "user"
    kate2 = await org.browser("kate", address=OFFICE)
    assert (await kate2.call("/mfa/api/verify/totp", {"code": _next(kate_secret)})).status == 200


async def test_an_address_guessing_across_users_is_locked_at_its_own_threshold(
    make_org: OrgFactory,
) -> None:
    org = await make_org(mfa={"lockout": {"max_failures_per_address": 4}})
    browsers = []
    for i in range(5):
        org.add_user(f"u{i}", f"u-{i}")
        browsers.append(await org.browser(f"u{i}", address=OFFICE))
        await browsers[-1].enroll_totp()  # a right code: its attempt is given back
    for browser in browsers[:3]:
        assert (await browser.call("/mfa/api/verify/totp", {"code": "000000"})).status == 400
    # The fourth wrong code from the address, whoever's, uses its last attempt.
    fourth = await browsers[3].call("/mfa/api/verify/totp", {"code": "000000"})
    assert fourth.status == 429
    answer = await browsers[4].call("/mfa/api/verify/totp", {"code": "000000"})
    assert answer.status == 429
    assert (await answer.json())["locked_by"] == "address"
    # Each user failed once at most; the same user from elsewhere is judged on their own.
    elsewhere = await org.browser("u4", address="192.0.2.200")
    assert (await elsewhere.call("/mfa/api/verify/totp", {"code": "000000"})).status == 400


# --- 4. user ids are exact ---------------------------------------------------------------


@pytest.mark.parametrize("look_alike", ["KATE", "Kate", " kate", "\u212aate", "kate\u00a0"])
async def test_a_look_alike_id_cannot_use_or_touch_anothers_mfa(
    make_org: OrgFactory, look_alike: str
) -> None:
    org = await make_org(security={"mfa_policy": "all", "grace_period": "0s"})
    org.add_user("kate", "kate")
    org.add_user("impostor", look_alike)
    kate = await org.browser("kate")
    secret, _ = await kate.enroll_totp()
    impostor = await org.browser("impostor")
    status = await impostor.status()
    assert status["user"] == look_alike
    assert not status["enrolled"]
    # kate's code means nothing to the impostor's account...
    refused = await impostor.call("/mfa/api/verify/totp", {"code": _next(secret)})
    assert refused.status == 409
    # ...enrolling there creates a separate record, kate's stays hers...
    await impostor.enroll_totp()
    assert (await org.stores[0].mfa.state("kate")).totp
    assert {u.user_id for u in await org.stores[0].users.all()} == {"kate", look_alike}
    # ...and the impostor's verification does not pass kate's gate.
    assert (await kate.get("/settings", headers={"Accept": "application/json"})).status == 200
    fresh_kate = await org.browser("kate")
    assert (await fresh_kate.get("/settings", headers={"Accept": "application/json"})).status == 403


# --- 11. refused admin actions are audited ------------------------------------------------


async def test_refused_admin_actions_are_audited_and_rate_limited(make_org: OrgFactory) -> None:
    org = await make_org()
    org.add_user("carol", "u-carol")
    org.add_user("bob", "u-bob", role="admin")
    carol = await org.browser("carol")
    for _ in range(30):
        assert (await carol.get("/mfa/api/admin/security")).status == 403
    refused = org.audit("admin.refused")
    assert len(refused) == 1
    assert refused[0]["actor"] == "u-carol"
    assert refused[0]["outcome"] == "forbidden"
    assert refused[0]["target"] == "/mfa/api/admin/security"

    bob = await org.browser("bob")
    assert (await bob.get("/mfa/api/admin/audit")).status == 403  # no verification yet
    no_csrf = await bob.client.post("/mfa/api/admin/users/u-carol/reset-mfa", headers=bob.headers())
    assert no_csrf.status == 403
    reasons = {(r["actor"], r["outcome"]) for r in org.audit("admin.refused")}
    assert ("u-bob", "step_up_required") in reasons
    assert ("u-bob", "csrf") in reasons
    registry = org.servers[0].app[METRICS].registry
    assert registry.get_sample_value("sidecar_admin_refusals_total", {"reason": "forbidden"}) == 30


# --- part two, 1. a reset cannot be outrun ----------------------------------------------


async def add_factor(
    intruder: Browser, authn: SoftAuthenticator, token: str, delay: float, added: asyncio.Event
) -> int:
    """One more passkey through begin and finish, after ``delay``; the final status."""
    await asyncio.sleep(delay)
    begun = await intruder.call("/mfa/api/passkey/begin", csrf=token)
    if begun.status != 200:
        return begun.status
    finish = await intruder.call(
        "/mfa/api/passkey/finish",
        {"credential": authn.create(await begun.json()), "name": "spare"},
        csrf=token,
    )
    if finish.status == 200:
        added.set()
    return finish.status


async def reset_after(service: MfaService, added: asyncio.Event, delay: float) -> int:
    """Reset once the intruder has added a factor (so the race is really run), a little
    later each round (so it lands at different points of the stream)."""
    await asyncio.wait_for(added.wait(), 30)
    await asyncio.sleep(delay)
    await service.reset("u-carol", Actor("u-admin", None))
    return 0


async def test_a_reset_racing_enrollments_on_another_replica_leaves_nothing_behind(
    make_org: OrgFactory,
) -> None:
    org = await make_org(replicas=2)
    org.add_user("carol", "u-carol")
    added_before_a_reset = 0
    for round_ in range(4):
        # The intruder holds a verified session (a console login of carol's) on replica 0.
        login = f"stolen-{round_}"
        org.add_user(login, "u-carol")
        intruder = await org.browser(login)
        authn = SoftAuthenticator(RP_ID, ORIGIN)
        first = await intruder.enroll_passkey(authn)
        assert first.status == 200, await first.text()
        token = (await intruder.status())["csrf_token"]
        # A steady stream of enrollments on replica 0, a reset on replica 1 in its middle.
        added = asyncio.Event()
        results = await asyncio.gather(
            *(add_factor(intruder, authn, token, 0.015 * i, added) for i in range(16)),
            reset_after(org.servers[1].app[MFA], added, 0.01 * round_),
        )
        statuses = list(results[:-1])
        # 400: a ceremony overtaken by a concurrent begin in the same session, or discarded
        # by the reset; 403/409: refused after the reset; 429: over the per-user limit of
        # concurrent sidecar calls.
        assert set(statuses) <= {200, 400, 403, 409, 429}, statuses
        added_before_a_reset += statuses.count(200)
        # Whatever was added before the reset went with it; nothing was added after it.
        state = await org.stores[0].mfa.state("u-carol")
        assert (state.passkeys, state.totp) == (0, False), (round_, statuses)
        assert not (await intruder.status())["verified"]
        # Nor can the evicted console session enroll the first new factor, with or without
        # its sidecar cookie.
        for browser in (intruder, await org.browser(login)):
            refused = await browser.call("/mfa/api/passkey/begin")
            assert refused.status == 403
            assert (await refused.json())["error"] == "sign_in_again"
    assert added_before_a_reset > 0  # the race was run: factors were added, then removed
    # The member, signed in to the console anew, enrolls and is the only one with a factor.
    org.add_user("carol-again", "u-carol")
    member = await org.browser("carol-again")
    assert (await member.enroll_passkey(SoftAuthenticator(RP_ID, ORIGIN))).status == 200
    assert (await org.stores[1].mfa.state("u-carol")).passkeys == 1
    refusals = [r for r in org.audit("mfa.enrolled") if r["outcome"] == "refused"]
    assert refusals
    assert {r["details"]["reason"] for r in refusals} == {"session_reset"}


async def test_a_session_verified_before_a_reset_never_counts_after_it(
    make_org: OrgFactory,
) -> None:
    org = await make_org(replicas=2, security={"mfa_policy": "all", "grace_period": "0s"})
    org.add_user("carol", "u-carol")
    carol = await org.browser("carol")
    secret, codes = await carol.enroll_totp()
    json_accept = {"Accept": "application/json"}
    assert (await carol.get("/settings", headers=json_accept)).status == 200
    await org.servers[1].app[MFA].reset("u-carol", Actor("cli", None))
    # On the other replica the gate's cache may still hold the old state for up to 5 s;
    # every sidecar route reads the store: nothing done with this session succeeds.
    assert not (await carol.status())["verified"]
    for path, body in [
        ("/mfa/api/recovery-codes/regenerate", None),
        ("/mfa/api/verify/totp", {"code": _next(secret)}),
        ("/mfa/api/verify/recovery", {"code": (codes or ["x"])[0]}),
    ]:
        assert (await carol.call(path, body)).status in (403, 409), path
