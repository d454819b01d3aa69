"""Recovery codes: stored as given (keyed hashes), single use, replaced as a set under the
user's generation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sidecar.store import SqlStore

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
CODES = [bytes([i]) * 32 for i in range(1, 11)]


async def replace(store: SqlStore, user: str, codes: list[bytes], generation: int = 0) -> bool:
    return await store.mfa.replace_recovery_codes(
        user, codes, expected_generation=generation, now=T0
    )


async def test_each_code_works_once(store: SqlStore) -> None:
    assert await replace(store, "alice", CODES)
    assert await store.mfa.recovery_codes_left("alice") == 10

    assert await store.mfa.use_recovery_code("alice", CODES[3], T0 + timedelta(minutes=1)) == 0
    assert await store.mfa.use_recovery_code("alice", CODES[3], T0 + timedelta(minutes=2)) is None
    assert await store.mfa.use_recovery_code("ALICE", CODES[4], T0) is None  # another user
    assert await store.mfa.recovery_codes_left("alice") == 9
    assert (await store.mfa.state("alice")).recovery_codes_left == 9


async def test_codes_belong_to_their_user(store: SqlStore) -> None:
    await replace(store, "alice", CODES[:5])
    await replace(store, "bob", CODES[5:])
    assert await store.mfa.use_recovery_code("bob", CODES[0], T0) is None
    assert await store.mfa.use_recovery_code("alice", b"\x00" * 32, T0) is None
    assert await store.mfa.recovery_codes_left("alice") == 5
    assert await store.mfa.recovery_codes_left("carol") == 0


async def test_replacing_invalidates_every_earlier_code(store: SqlStore) -> None:
    await replace(store, "alice", CODES[:5])
    await store.mfa.use_recovery_code("alice", CODES[0], T0)

    await replace(store, "alice", CODES[5:])
    assert await store.mfa.recovery_codes_left("alice") == 5
    for old in CODES[:5]:
        assert await store.mfa.use_recovery_code("alice", old, T0 + timedelta(days=1)) is None
    assert await store.mfa.use_recovery_code("alice", CODES[5], T0 + timedelta(days=1)) == 0

    await replace(store, "alice", [])
    assert await store.mfa.recovery_codes_left("alice") == 0


async def test_a_stale_session_cannot_replace_codes(store: SqlStore) -> None:
    await replace(store, "alice", CODES[:5])
    await store.mfa.reset("alice")  # generation 1; the codes are gone
    assert not await replace(store, "alice", CODES[5:], generation=0)
    assert await store.mfa.recovery_codes_left("alice") == 0
    assert await replace(store, "alice", CODES[5:], generation=1)


async def test_a_code_used_after_a_reset_is_gone(store: SqlStore) -> None:
    await replace(store, "alice", CODES)
    await store.mfa.reset("alice")
    assert await store.mfa.use_recovery_code("alice", CODES[0], T0) is None


async def test_concurrent_use_of_one_code_succeeds_once(store: SqlStore, replica: SqlStore) -> None:
    await replace(store, "alice", CODES)
    results = await asyncio.gather(
        *((store, replica)[i % 2].mfa.use_recovery_code("alice", CODES[0], T0) for i in range(20))
    )
    assert sum(r is not None for r in results) == 1
    assert await store.mfa.recovery_codes_left("alice") == 9


async def test_concurrent_regenerations_leave_one_set(store: SqlStore, replica: SqlStore) -> None:
    sets = [[bytes([n, i]) * 16 for i in range(10)] for n in range(6)]
    await asyncio.gather(
        *(
            (store, replica)[n % 2].mfa.replace_recovery_codes(
                "alice", codes, expected_generation=0, now=T0
            )
            for n, codes in enumerate(sets)
        )
    )
    assert await store.mfa.recovery_codes_left("alice") == 10
    winners = [
        codes
        for codes in sets
        if await store.mfa.use_recovery_code("alice", codes[0], T0) is not None
    ]
    assert len(winners) == 1
