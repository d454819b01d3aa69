"""Passkeys, WebAuthn user handles and single-use challenges."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from sidecar.store import PasskeyRecord, SqlStore
from tests.store.support import add_passkey

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def record(
    user_id: str = "alice", credential_id: bytes = b"\x01cred", **changes: object
) -> PasskeyRecord:
    base = PasskeyRecord(
        credential_id=credential_id,
        user_id=user_id,
        public_key=b"\xa5\x01\x02\x03\x26",
        sign_count=7,
        transports=("internal", "hybrid"),
        aaguid="adce0002-35bc-c60a-648b-0b25f1f05503",
        backup_eligible=True,
        backup_state=False,
        name="Laptop",
        created_at=T0,
        last_used_at=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


async def test_passkeys_round_trip(store: SqlStore) -> None:
    first = record()
    second = record(
        credential_id=b"\x00\xffsecond",
        transports=(),
        backup_eligible=False,
        name="Phone",
        created_at=T0 + timedelta(hours=1),
        last_used_at=T0 + timedelta(hours=2),
    )
    await add_passkey(store, first)
    await add_passkey(store, second)
    await add_passkey(store, record("bob", b"bob-cred"))
    await add_passkey(store, record("Alice", b"other-alice"))  # another user: ids are exact

    assert await store.mfa.passkeys("alice") == [first, second]
    assert await store.mfa.passkey(second.credential_id) == second
    assert await store.mfa.passkey(b"unknown") is None
    assert await store.mfa.passkeys("carol") == []


async def test_a_registered_credential_is_never_overwritten(store: SqlStore) -> None:
    await add_passkey(store, record("alice"))
    with pytest.raises(ValueError, match="already registered"):
        await add_passkey(store, record("mallory", public_key=b"attacker"))
    assert await store.mfa.passkey(record().credential_id) == record("alice")


async def test_sign_count_update_is_conditional(store: SqlStore) -> None:
    await add_passkey(store, record(sign_count=7))
    cred = record().credential_id
    later = T0 + timedelta(minutes=1)

    assert None is not await store.mfa.record_passkey_use(
        cred, old_sign_count=7, new_sign_count=8, backup_state=True, now=later
    )
    updated = await store.mfa.passkey(cred)
    assert updated is not None
    assert (updated.sign_count, updated.backup_state, updated.last_used_at) == (8, True, later)

    # A second use that read the old count loses (a cloned authenticator, or a race).
    assert None is await store.mfa.record_passkey_use(
        cred, old_sign_count=7, new_sign_count=9, backup_state=False, now=later
    )
    assert None is await store.mfa.record_passkey_use(
        b"unknown", old_sign_count=0, new_sign_count=1, backup_state=False, now=later
    )
    unchanged = await store.mfa.passkey(cred)
    assert unchanged is not None
    assert unchanged.sign_count == 8


async def test_concurrent_uses_from_one_count_succeed_once(
    store: SqlStore, replica: SqlStore
) -> None:
    await add_passkey(store, record(sign_count=0))
    results = await asyncio.gather(
        *(
            (store, replica)[i % 2].mfa.record_passkey_use(
                record().credential_id,
                old_sign_count=0,
                new_sign_count=1,
                backup_state=False,
                now=T0,
            )
            for i in range(6)
        )
    )
    assert sum(r is not None for r in results) == 1


async def test_delete_and_rename_only_own_passkeys(store: SqlStore) -> None:
    await add_passkey(store, record("alice"))
    cred = record().credential_id

    assert not await store.mfa.rename_passkey("bob", cred, "Stolen")
    assert not await store.mfa.rename_passkey("Alice", cred, "Stolen")  # not alice
    assert await store.mfa.rename_passkey("alice", cred, "Work laptop")
    renamed = await store.mfa.passkey(cred)
    assert renamed is not None
    assert renamed.name == "Work laptop"

    assert await store.mfa.remove_passkey("bob", cred, expected_generation=0) is None
    assert await store.mfa.remove_passkey("ALICE", cred, expected_generation=0) is None
    assert await store.mfa.remove_passkey("alice", cred, expected_generation=0) == 1
    assert await store.mfa.passkey(cred) is None
    assert await store.mfa.remove_passkey("alice", cred, expected_generation=1) is None
    assert not await store.mfa.rename_passkey("alice", cred, "gone")


async def test_user_handle_is_stable_random_and_per_user(store: SqlStore) -> None:
    handle = await store.mfa.user_handle("alice")
    assert len(handle) == 32
    assert await store.mfa.user_handle("alice") == handle
    assert await store.mfa.user_handle("Alice") != handle  # another user
    other = await store.mfa.user_handle("bob")
    assert other != handle
    assert await store.mfa.user_for_handle(handle) == "alice"
    assert await store.mfa.user_for_handle(other) == "bob"
    assert await store.mfa.user_for_handle(b"\x00" * 32) is None
    # A bumped generation and a handle share a row without disturbing each other.
    await store.mfa.reset("alice")
    assert await store.mfa.user_handle("alice") == handle
    assert await store.mfa.user_handle("new-after-bump") != handle


async def test_concurrent_first_handles_agree(store: SqlStore, replica: SqlStore) -> None:
    handles = await asyncio.gather(
        *((store, replica)[i % 2].mfa.user_handle("carol") for i in range(8))
    )
    assert len(set(handles)) == 1
    await store.mfa.reset("dave")
    assert (
        len(
            set(
                await asyncio.gather(store.mfa.user_handle("dave"), replica.mfa.user_handle("dave"))
            )
        )
        == 1
    )


CHALLENGE = {
    "user_id": "alice",
    "session_id": "sess-1",
    "purpose": "authenticate",
}


async def put(store: SqlStore, challenge_id: str = "ch-1", **changes: object) -> None:
    fields: dict[str, object] = {**CHALLENGE, "challenge": b"\x01" * 32}
    fields["expires_at"] = T0 + timedelta(minutes=5)
    fields.update(changes)
    await store.mfa.put_challenge(challenge_id, **fields)  # type: ignore[arg-type]


async def test_a_challenge_is_taken_once(store: SqlStore) -> None:
    await put(store)
    assert await store.mfa.take_challenge("ch-1", **CHALLENGE, now=T0) == b"\x01" * 32
    assert await store.mfa.take_challenge("ch-1", **CHALLENGE, now=T0) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("user_id", "mallory"), ("session_id", "sess-2"), ("purpose", "register")],
)
async def test_a_challenge_is_bound_to_user_session_and_purpose(
    store: SqlStore, field: str, value: str
) -> None:
    await put(store)
    assert await store.mfa.take_challenge("ch-1", **{**CHALLENGE, field: value}, now=T0) is None
    # The mismatched attempt did not burn it for its owner.
    assert await store.mfa.take_challenge("ch-1", **CHALLENGE, now=T0) == b"\x01" * 32


async def test_a_challenge_belongs_to_the_exact_user(store: SqlStore) -> None:
    await put(store, user_id="Alice")
    assert await store.mfa.take_challenge("ch-1", **CHALLENGE, now=T0) is None  # "alice"
    assert await store.mfa.take_challenge("ch-1", **{**CHALLENGE, "user_id": "Alice"}, now=T0)


async def test_an_expired_challenge_is_refused(store: SqlStore) -> None:
    expiry = T0 + timedelta(minutes=5)
    await put(store, "ch-1", expires_at=expiry)
    await put(store, "ch-2", expires_at=expiry)
    # Expiry compares instants, whatever offset the caller's clock value carries.
    just_before = (expiry - timedelta(microseconds=1)).astimezone(timezone(timedelta(hours=-8)))
    assert await store.mfa.take_challenge("ch-2", **CHALLENGE, now=just_before) is not None
    assert await store.mfa.take_challenge("ch-1", **CHALLENGE, now=expiry) is None
    assert await store.mfa.take_challenge("ch-1", **CHALLENGE, now=T0) is None  # pruned


async def test_concurrent_takes_succeed_once(store: SqlStore, replica: SqlStore) -> None:
    await put(store)
    results = await asyncio.gather(
        *((store, replica)[i % 2].mfa.take_challenge("ch-1", **CHALLENGE, now=T0) for i in range(8))
    )
    assert sum(r is not None for r in results) == 1


async def test_only_the_newest_ceremonies_of_a_user_stay_open(store: SqlStore) -> None:
    for i in range(12):
        await put(store, f"ch-{i:02d}", expires_at=T0 + timedelta(minutes=5, seconds=i))
    await put(store, "other", user_id="bob", expires_at=T0 + timedelta(minutes=1))
    open_ones = [
        i
        for i in range(12)
        if await store.mfa.take_challenge(f"ch-{i:02d}", **CHALLENGE, now=T0) is not None
    ]
    assert open_ones == list(range(7, 12))  # the five newest
    bob = {**CHALLENGE, "user_id": "bob"}
    assert await store.mfa.take_challenge("other", **bob, now=T0) is not None
