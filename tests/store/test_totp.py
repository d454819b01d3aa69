"""TOTP: pending secrets, confirmation, encryption at rest and the replay guard."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from sidecar.store import SqlStore, StoreUnavailable
from sidecar.store import schema as tables
from tests.store.support import StoreTarget

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
OTHER_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"


async def enroll(store: SqlStore, user: str, step: int = 100) -> None:
    await store.set_pending_totp(user, SECRET, T0)
    assert await store.confirm_totp(user, SECRET, step, T0)


async def test_pending_secret_is_replaced_and_per_user(store: SqlStore) -> None:
    assert await store.pending_totp("alice") is None
    await store.set_pending_totp("alice", SECRET, T0)
    await store.set_pending_totp("Alice", OTHER_SECRET, T0 + timedelta(seconds=5))
    assert await store.pending_totp("ALICE") == OTHER_SECRET
    assert await store.pending_totp("bob") is None


async def test_confirm_needs_the_pending_secret(store: SqlStore) -> None:
    assert not await store.confirm_totp("alice", SECRET, 100, T0)  # nothing pending

    await store.set_pending_totp("alice", SECRET, T0)
    assert not await store.confirm_totp("alice", OTHER_SECRET, 100, T0)
    assert await store.pending_totp("alice") == SECRET  # a wrong guess does not clear it
    assert await store.totp("alice") is None

    assert await store.confirm_totp("alice", SECRET, 100, T0 + timedelta(seconds=1))
    assert await store.pending_totp("alice") is None
    record = await store.totp("alice")
    assert record is not None
    assert (record.secret, record.last_step) == (SECRET, 100)
    assert record.created_at == record.last_used_at == T0 + timedelta(seconds=1)

    assert not await store.confirm_totp("alice", SECRET, 101, T0)  # pending is gone


async def test_reenrolling_replaces_the_secret(store: SqlStore) -> None:
    await enroll(store, "alice", step=100)
    await store.set_pending_totp("alice", OTHER_SECRET, T0)
    assert await store.confirm_totp("alice", OTHER_SECRET, 50, T0)
    record = await store.totp("alice")
    assert record is not None
    assert (record.secret, record.last_step) == (OTHER_SECRET, 50)


async def test_concurrent_confirms_of_one_pending_secret(
    store: SqlStore, replica: SqlStore
) -> None:
    await store.set_pending_totp("alice", SECRET, T0)
    results = await asyncio.gather(
        *((store, replica)[i % 2].confirm_totp("alice", SECRET, 100, T0) for i in range(6))
    )
    assert results.count(True) == 1


async def test_secrets_are_encrypted_at_rest(store: SqlStore, target: StoreTarget) -> None:
    await enroll(store, "alice")
    await store.set_pending_totp("bob", OTHER_SECRET, T0)

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
            await other.totp("alice")
    finally:
        await other.close()


async def test_a_time_step_is_accepted_once_and_never_an_older_one(store: SqlStore) -> None:
    assert not await store.accept_totp_step("alice", 5, T0)  # not enrolled
    await enroll(store, "alice", step=100)

    assert not await store.accept_totp_step("alice", 100, T0)  # the confirming step
    assert not await store.accept_totp_step("alice", 99, T0)
    assert await store.accept_totp_step("alice", 101, T0 + timedelta(seconds=30))
    assert not await store.accept_totp_step("alice", 101, T0 + timedelta(seconds=31))
    assert not await store.accept_totp_step("alice", 100, T0 + timedelta(seconds=31))
    assert await store.accept_totp_step("alice", 103, T0 + timedelta(seconds=90))

    record = await store.totp("alice")
    assert record is not None
    assert (record.last_step, record.last_used_at) == (103, T0 + timedelta(seconds=90))


async def test_steps_are_per_user(store: SqlStore) -> None:
    await enroll(store, "alice", step=100)
    await enroll(store, "bob", step=100)
    assert await store.accept_totp_step("alice", 101, T0)
    assert await store.accept_totp_step("bob", 101, T0)


async def test_concurrent_use_of_one_step_succeeds_once(store: SqlStore, replica: SqlStore) -> None:
    await enroll(store, "alice", step=100)
    results = await asyncio.gather(
        *((store, replica)[i % 2].accept_totp_step("alice", 101, T0) for i in range(10))
    )
    assert results.count(True) == 1


async def test_delete_totp(store: SqlStore) -> None:
    assert not await store.delete_totp("alice")
    await enroll(store, "alice")
    await store.set_pending_totp("alice", OTHER_SECRET, T0)
    assert await store.delete_totp("ALICE")
    assert await store.totp("alice") is None
    assert await store.pending_totp("alice") is None
    assert not (await store.mfa_state("alice")).totp
    assert not await store.delete_totp("alice")
