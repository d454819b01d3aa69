"""Users, grace clocks, the per-user MFA summary and resets; ids are exact."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from sidecar.store import PasskeyRecord, SqlStore
from tests.store.support import add_passkey

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def passkey(user_id: str, credential_id: bytes) -> PasskeyRecord:
    return PasskeyRecord(
        credential_id=credential_id,
        user_id=user_id,
        public_key=b"pk",
        sign_count=0,
        transports=("internal",),
        aaguid="00000000-0000-0000-0000-000000000000",
        backup_eligible=False,
        backup_state=False,
        name="key",
        created_at=T0,
        last_used_at=None,
    )


async def test_touch_user_keeps_first_seen_and_updates_the_rest(store: SqlStore) -> None:
    first = await store.users.touch("alice@example.com", email="a@x", role="member", now=T0)
    later = T0 + timedelta(hours=1)
    second = await store.users.touch("alice@example.com", email=None, role="admin", now=later)

    assert first.user_id == second.user_id == "alice@example.com"
    assert (second.email, second.role) == (None, "admin")
    assert (second.first_seen, second.last_seen) == (T0, later)
    assert second.mfa_generation == 0
    assert await store.users.all() == [second]


# Spellings a case-folding, trimming or compatibility-normalising key would merge.
LOOK_ALIKES = [
    ("kate", "KATE"),
    ("kate", "Kate"),
    ("kate", " kate"),
    ("kate", "kate\u00a0"),
    ("kate", "\u212aate"),  # KELVIN SIGN folds to k
    ("strasse", "stra\u00dfe"),  # casefold: ß -> ss
    ("sam", "\u017fam"),  # LONG S folds to s
    ("caf\u00e9", "cafe\u0301"),  # NFC vs NFD
    ("ab", "\uff41\uff42"),  # fullwidth letters (NFKC)
]


@pytest.mark.parametrize(("one", "other"), LOOK_ALIKES, ids=[repr(b) for _, b in LOOK_ALIKES])
async def test_user_ids_are_exact_everywhere(store: SqlStore, one: str, other: str) -> None:
    await store.users.touch(one, email=None, role=None, now=T0)
    await store.users.touch(other, email=None, role=None, now=T0)
    assert {u.user_id for u in await store.users.all()} == {one, other}

    await add_passkey(store, passkey(one, b"cred-" + one.encode()))
    assert (await store.mfa.state(one)).enrolled
    assert not (await store.mfa.state(other)).enrolled
    # The look-alike cannot enroll "next to" the other user's factor, nor remove it...
    assert await store.mfa.passkeys(other) == []
    assert (
        await store.mfa.remove_passkey(other, b"cred-" + one.encode(), expected_generation=0)
        is None
    )
    # ...and a reset of one leaves the other alone.
    await store.mfa.replace_recovery_codes(other, [b"h" * 32], expected_generation=0, now=T0)
    await store.mfa.reset(one)
    assert await store.mfa.recovery_codes_left(other) == 1
    assert (await store.mfa.state(other)).mfa_generation == 0
    assert await store.mfa.user_handle(one) != await store.mfa.user_handle(other)


async def test_list_users_sorted_by_id(store: SqlStore) -> None:
    for name in ("carol", "alice", "bob"):
        await store.users.touch(name, email=None, role=None, now=T0)
    assert [u.user_id for u in await store.users.all()] == ["alice", "bob", "carol"]


async def test_a_grace_clock_starts_once_and_never_moves(store: SqlStore) -> None:
    assert await store.users.grace_started("alice", T0) == T0
    # Re-login, new sessions, other replicas: the clock never restarts.
    assert await store.users.grace_started("alice", T0 + timedelta(days=3)) == T0
    await store.users.grace_started("bob", T0 + timedelta(days=2))
    assert await store.users.grace_starts() == {"alice": T0, "bob": T0 + timedelta(days=2)}


async def test_grace_clocks_are_per_exact_user(store: SqlStore) -> None:
    await store.users.grace_started("alice", T0)
    assert await store.users.grace_started("ALICE", T0 + timedelta(days=2)) == T0 + timedelta(
        days=2
    )


async def test_concurrent_first_grace_calls_agree_on_one_start(
    store: SqlStore, replica: SqlStore
) -> None:
    starts = await asyncio.gather(
        *(
            (store if i % 2 else replica).users.grace_started("dave", T0 + timedelta(seconds=i))
            for i in range(16)
        )
    )
    assert len(set(starts)) == 1
    assert (await store.users.grace_starts())["dave"] == starts[0]


async def test_mfa_state_counts_methods(store: SqlStore) -> None:
    assert (await store.mfa.state("erin")).enrolled is False

    await store.users.touch("erin", email=None, role=None, now=T0)
    await add_passkey(store, passkey("erin", b"cred-1"))
    await add_passkey(store, passkey("erin", b"cred-2"))
    await add_passkey(store, passkey("frank", b"cred-3"))
    await store.mfa.replace_recovery_codes(
        "erin", [b"h1", b"h2", b"h3"], expected_generation=0, now=T0
    )
    await store.mfa.use_recovery_code("erin", b"h1", T0)
    await store.mfa.begin_totp("erin", "JBSWY3DPEHPK3PXP", session_id="s", now=T0)

    state = await store.mfa.state("erin")
    assert (state.totp, state.passkeys, state.recovery_codes_left) == (False, 2, 2)
    assert state.enrolled


async def test_enrolled_users_lists_totp_and_passkey_users_once(store: SqlStore) -> None:
    assert await store.mfa.enrolled_users() == set()
    await add_passkey(store, passkey("gina", b"cred-g1"))
    await add_passkey(store, passkey("gina", b"cred-g2"))
    await store.mfa.begin_totp("hank", "JBSWY3DPEHPK3PXP", session_id="s", now=T0)
    assert await store.mfa.enrolled_users() == {"gina"}  # a pending secret is no method
    assert (
        await store.mfa.confirm_totp(
            "hank",
            secret="JBSWY3DPEHPK3PXP",
            step=100,
            session_id="s",
            issued_after=T0 - timedelta(minutes=1),
            expected_generation=None,
            now=T0,
        )
        == 0
    )
    await store.mfa.replace_recovery_codes("ivy", [b"h1"], expected_generation=0, now=T0)
    assert await store.mfa.enrolled_users() == {"gina", "hank"}  # codes alone are no method


async def test_reset_bumps_the_generation_and_removes_everything(store: SqlStore) -> None:
    await store.users.touch("gina", email=None, role=None, now=T0)
    assert await store.mfa.reset("gina") == (False, 1)  # nothing to remove, sessions end
    await add_passkey(store, passkey("gina", b"cred-g"))
    await store.mfa.replace_recovery_codes("gina", [b"h1"], expected_generation=1, now=T0)
    await store.mfa.begin_totp("gina", "JBSWY3DPEHPK3PXP", session_id="s", now=T0)
    await store.mfa.put_challenge(
        "ch",
        user_id="gina",
        session_id="s",
        purpose="p",
        challenge=b"x",
        expires_at=T0 + timedelta(minutes=2),
    )
    assert await store.mfa.reset("gina") == (True, 2)
    state = await store.mfa.state("gina")
    assert (state.enrolled, state.recovery_codes_left, state.mfa_generation) == (False, 0, 2)
    assert await store.mfa.pending_totp("gina") is None
    assert (
        await store.mfa.take_challenge("ch", user_id="gina", session_id="s", purpose="p", now=T0)
        is None
    )
    # The generation survives later visits, and works for ids never seen (CLI resets).
    assert (await store.users.touch("gina", email=None, role=None, now=T0)).mfa_generation == 2
    assert await store.mfa.reset("Nobody") == (False, 1)
    assert (await store.mfa.state("never-reset")).mfa_generation == 0


async def test_a_reset_revokes_every_console_session_that_verified(
    store: SqlStore, replica: SqlStore
) -> None:
    await store.mfa.record_binding("gina", "console-session-1", T0)
    await store.mfa.record_binding("gina", "console-session-2", T0)
    await store.mfa.record_binding("hank", "console-session-1", T0)  # another user's
    assert not await store.mfa.binding_revoked("gina", "console-session-1")
    await replica.mfa.reset("gina")
    assert await store.mfa.binding_revoked("gina", "console-session-1")
    assert await store.mfa.binding_revoked("gina", "console-session-2")
    assert not await store.mfa.binding_revoked("hank", "console-session-1")
    assert not await store.mfa.binding_revoked("gina", "a-new-console-login")
    # Verifying again later (after re-enrolling elsewhere) never un-revokes it...
    await store.mfa.record_binding("gina", "console-session-1", T0 + timedelta(hours=1))
    assert await store.mfa.binding_revoked("gina", "console-session-1")
    # ...and the store refuses a first enrollment from it, whatever the caller checked.
    record = passkey("gina", b"cred-after-reset")
    assert (
        await store.mfa.add_passkey(record, expected_generation=None, binding="console-session-1")
        is None
    )
    assert (
        await store.mfa.add_passkey(record, expected_generation=None, binding="a-new-console-login")
        == 1
    )


async def test_console_sessions_are_forgotten_90_days_after_their_last_verification(
    store: SqlStore,
) -> None:
    await store.mfa.record_binding("gina", "old", T0)
    await store.mfa.record_binding("gina", "recent", T0 + timedelta(days=80))
    await store.mfa.record_binding("gina", "now", T0 + timedelta(days=91))
    await store.mfa.reset("gina")
    assert not await store.mfa.binding_revoked("gina", "old")  # forgotten before the reset
    assert await store.mfa.binding_revoked("gina", "recent")
