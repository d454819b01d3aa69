"""TOTP: pending secrets bound to a session, conditional confirmation, encryption at rest and
the replay guard."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from sidecar.store import SqlStore, StoreUnavailable
from sidecar.store import schema as tables
from tests.store.support import StoreTarget, add_passkey
from tests.store.test_passkeys import record

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
OTHER_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
LONG_AGO = T0 - timedelta(minutes=10)


async def confirm(
    store: SqlStore,
    user: str,
    secret: str = SECRET,
    *,
    step: int = 100,
    session: str = "s1",
    issued_after: datetime = LONG_AGO,
    expected_generation: int | None = None,
) -> int | None:
    return await store.mfa.confirm_totp(
        user,
        secret=secret,
        step=step,
        session_id=session,
        issued_after=issued_after,
        expected_generation=expected_generation,
        now=T0,
    )


async def enroll(store: SqlStore, user: str, step: int = 100) -> None:
    await store.mfa.begin_totp(user, SECRET, session_id="s1", now=T0)
    assert await confirm(store, user, step=step) is not None


async def test_pending_secret_is_replaced_and_per_exact_user(store: SqlStore) -> None:
    assert await store.mfa.pending_totp("alice") is None
    await store.mfa.begin_totp("alice", SECRET, session_id="s1", now=T0)
    await store.mfa.begin_totp(
        "alice", OTHER_SECRET, session_id="s2", now=T0 + timedelta(seconds=5)
    )
    pending = await store.mfa.pending_totp("alice")
    assert pending is not None
    assert (pending.secret, pending.session_id) == (OTHER_SECRET, "s2")
    assert await store.mfa.pending_totp("Alice") is None  # another user
    assert await store.mfa.pending_totp("bob") is None


async def test_confirm_needs_the_pending_secret_of_this_session(store: SqlStore) -> None:
    assert await confirm(store, "alice") is None  # nothing pending

    await store.mfa.begin_totp("alice", SECRET, session_id="s1", now=T0)
    assert await confirm(store, "alice", OTHER_SECRET) is None
    assert await confirm(store, "alice", session="attacker") is None  # begun elsewhere
    assert await confirm(store, "ALICE") is None  # another user's key
    assert await confirm(store, "alice", issued_after=T0) is None  # expired
    assert await store.mfa.pending_totp("alice") is not None  # misses do not clear it
    assert await store.mfa.totp("alice") is None

    assert await confirm(store, "alice") == 0
    assert await store.mfa.pending_totp("alice") is None
    stored = await store.mfa.totp("alice")
    assert stored is not None
    assert (stored.secret, stored.last_step) == (SECRET, 100)
    assert await confirm(store, "alice", step=101) is None  # pending is gone


async def test_a_first_enrollment_is_refused_once_the_account_has_a_method(
    store: SqlStore,
) -> None:
    await store.mfa.begin_totp("alice", SECRET, session_id="s1", now=T0)
    await add_passkey(store, record("alice"))  # enrolled elsewhere meanwhile (it also
    # discards the pending secret: begun against the old state)
    assert await store.mfa.pending_totp("alice") is None
    await store.mfa.begin_totp("alice", SECRET, session_id="s1", now=T0)
    assert await confirm(store, "alice", expected_generation=None) is None
    # A stepped-up session under the current generation may add it.
    assert await confirm(store, "alice", expected_generation=0) == 0


async def test_an_existing_totp_is_never_overwritten(store: SqlStore) -> None:
    await enroll(store, "alice", step=100)
    await store.mfa.begin_totp("alice", OTHER_SECRET, session_id="s1", now=T0)
    assert await confirm(store, "alice", OTHER_SECRET, step=50, expected_generation=0) is None
    stored = await store.mfa.totp("alice")
    assert stored is not None
    assert stored.secret == SECRET


async def test_concurrent_confirms_of_one_pending_secret(
    store: SqlStore, replica: SqlStore
) -> None:
    await store.mfa.begin_totp("alice", SECRET, session_id="s1", now=T0)
    results = await asyncio.gather(*(confirm((store, replica)[i % 2], "alice") for i in range(12)))
    assert sum(r is not None for r in results) == 1


async def test_secrets_are_encrypted_at_rest(store: SqlStore, target: StoreTarget) -> None:
    await enroll(store, "alice")
    await store.mfa.begin_totp("bob", OTHER_SECRET, session_id="s1", now=T0)

    async with store.engine.connect() as conn:
        stored = (await conn.execute(select(tables.totp))).mappings().one()
        pending = (await conn.execute(select(tables.pending_totp))).mappings().one()
    for row, secret in ((stored, SECRET), (pending, OTHER_SECRET)):
        raw = repr(dict(row))
        assert secret not in raw
        assert secret.lower() not in raw.lower()
        assert Fernet(target.encryption_key).decrypt(row["secret_encrypted"]) == secret.encode()


async def test_a_different_key_cannot_read_secrets(store: SqlStore, target: StoreTarget) -> None:
    await enroll(store, "alice")
    other = target.open(encryption_key=Fernet.generate_key().decode())
    try:
        with pytest.raises(StoreUnavailable, match="encryption_key"):
            await other.mfa.totp("alice")
    finally:
        await other.close()


async def test_a_time_step_is_accepted_once_and_never_an_older_one(store: SqlStore) -> None:
    assert await store.mfa.accept_totp_step("alice", 5, T0) is None  # not enrolled
    await enroll(store, "alice", step=100)

    accept = store.mfa.accept_totp_step
    assert await accept("alice", 100, T0) is None  # the confirming step
    assert await accept("alice", 99, T0) is None
    assert await accept("alice", 101, T0 + timedelta(seconds=30)) == 0
    assert await accept("alice", 101, T0 + timedelta(seconds=31)) is None
    assert await accept("alice", 100, T0 + timedelta(seconds=31)) is None
    assert await accept("alice", 103, T0 + timedelta(seconds=90)) == 0
    assert await accept("Alice", 104, T0 + timedelta(seconds=90)) is None  # another user

    stored = await store.mfa.totp("alice")
    assert stored is not None
    assert (stored.last_step, stored.last_used_at) == (103, T0 + timedelta(seconds=90))


async def test_concurrent_use_of_one_step_succeeds_once(store: SqlStore, replica: SqlStore) -> None:
    await enroll(store, "alice", step=100)
    results = await asyncio.gather(
        *((store, replica)[i % 2].mfa.accept_totp_step("alice", 101, T0) for i in range(20))
    )
    assert sum(r is not None for r in results) == 1


async def test_remove_totp_is_conditional_and_ends_sessions(store: SqlStore) -> None:
    assert await store.mfa.remove_totp("alice", expected_generation=0) is None
    await enroll(store, "alice")
    await store.mfa.begin_totp("alice", OTHER_SECRET, session_id="s1", now=T0)
    assert await store.mfa.remove_totp("alice", expected_generation=7) is None  # stale session
    assert await store.mfa.remove_totp("alice", expected_generation=0) == 1  # the new generation
    assert await store.mfa.totp("alice") is None
    assert await store.mfa.pending_totp("alice") is None
    assert not (await store.mfa.state("alice")).totp
    assert await store.mfa.remove_totp("alice", expected_generation=1) is None
