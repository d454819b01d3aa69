"""Users, grace clocks and the per-user MFA summary."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sidecar.store import PasskeyRecord, SqlStore

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
    first = await store.touch_user("Alice@Example.com", email="a@x", role="member", now=T0)
    later = T0 + timedelta(hours=1)
    second = await store.touch_user(" alice@example.COM", email=None, role="admin", now=later)

    assert first.user_id == second.user_id == "alice@example.com"
    assert second.display_id == " alice@example.COM"
    assert (second.email, second.role) == (None, "admin")
    assert (second.first_seen, second.last_seen) == (T0, later)
    assert second.mfa_generation == 0
    assert await store.list_users() == [second]


async def test_last_seen_never_moves_backwards(store: SqlStore) -> None:
    await store.touch_user("bob", email=None, role=None, now=T0 + timedelta(minutes=5))
    record = await store.touch_user("bob", email=None, role=None, now=T0)
    assert record.last_seen == T0 + timedelta(minutes=5)


async def test_list_users_sorted_by_key(store: SqlStore) -> None:
    for name in ("carol", "Alice", "bob"):
        await store.touch_user(name, email=None, role=None, now=T0)
    assert [u.user_id for u in await store.list_users()] == ["alice", "bob", "carol"]


async def test_grace_start_is_fixed_and_epochs_are_independent(store: SqlStore) -> None:
    assert await store.grace_started("Alice", 1, T0) == T0
    # Re-login, new sessions, other replicas: the clock never restarts.
    assert await store.grace_started("alice", 1, T0 + timedelta(days=3)) == T0
    # A tightened policy (new epoch) starts a new clock; the old one is untouched.
    assert await store.grace_started("alice", 2, T0 + timedelta(days=1)) == T0 + timedelta(days=1)
    await store.grace_started("bob", 2, T0 + timedelta(days=2))

    assert await store.grace_starts(1) == {"alice": T0}
    assert await store.grace_starts(2) == {
        "alice": T0 + timedelta(days=1),
        "bob": T0 + timedelta(days=2),
    }
    assert await store.grace_starts(3) == {}


async def test_concurrent_first_grace_calls_agree_on_one_start(
    store: SqlStore, replica: SqlStore
) -> None:
    starts = await asyncio.gather(
        *(
            (store if i % 2 else replica).grace_started("dave", 7, T0 + timedelta(seconds=i))
            for i in range(8)
        )
    )
    assert len(set(starts)) == 1
    assert await store.grace_starts(7) == {"dave": starts[0]}


async def test_mfa_state_counts_methods(store: SqlStore) -> None:
    assert (await store.mfa_state("erin")).enrolled is False

    await store.touch_user("erin", email=None, role=None, now=T0)
    await store.add_passkey(passkey("Erin", b"cred-1"))
    await store.add_passkey(passkey("erin", b"cred-2"))
    await store.add_passkey(passkey("frank", b"cred-3"))
    await store.replace_recovery_codes("erin", [b"h1", b"h2", b"h3"], T0)
    await store.use_recovery_code("erin", b"h1", T0)
    await store.set_pending_totp("erin", "JBSWY3DPEHPK3PXP", T0)

    state = await store.mfa_state("ERIN")
    assert (state.totp, state.passkeys, state.recovery_codes_left) == (False, 2, 2)
    assert state.enrolled

    assert await store.confirm_totp("erin", "JBSWY3DPEHPK3PXP", 100, T0)
    assert (await store.mfa_state("erin")).totp


async def test_enrolled_user_keys_lists_totp_and_passkey_users_once(store: SqlStore) -> None:
    assert await store.enrolled_user_keys() == set()
    await store.add_passkey(passkey("Gina", b"cred-g1"))
    await store.add_passkey(passkey("gina", b"cred-g2"))
    await store.set_pending_totp("hank", "JBSWY3DPEHPK3PXP", T0)
    assert await store.enrolled_user_keys() == {"gina"}  # a pending secret is no method
    assert await store.confirm_totp("hank", "JBSWY3DPEHPK3PXP", 100, T0)
    await store.replace_recovery_codes("ivy", [b"h1"], T0)  # codes alone are no method
    assert await store.enrolled_user_keys() == {"gina", "hank"}


async def test_bump_mfa_generation(store: SqlStore) -> None:
    await store.touch_user("gina", email=None, role=None, now=T0)
    assert await store.bump_mfa_generation("Gina") == 1
    assert await store.bump_mfa_generation("gina") == 2
    assert (await store.mfa_state("gina")).mfa_generation == 2
    # The generation survives later visits.
    assert (await store.touch_user("gina", email=None, role=None, now=T0)).mfa_generation == 2
    # Also for a user the store has not recorded (e.g. a reset by id from the CLI).
    assert await store.bump_mfa_generation("Nobody") == 1
    assert (await store.mfa_state("nobody")).mfa_generation == 1
    assert (await store.mfa_state("never-bumped")).mfa_generation == 0
