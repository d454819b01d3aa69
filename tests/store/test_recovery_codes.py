"""Recovery codes: stored as given (keyed hashes), single use, replaced as a set."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sidecar.store import SqlStore

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
CODES = [bytes([i]) * 32 for i in range(1, 11)]


async def test_each_code_works_once(store: SqlStore) -> None:
    await store.replace_recovery_codes("Alice", CODES, T0)
    assert await store.recovery_codes_left("alice") == 10

    assert await store.use_recovery_code("alice", CODES[3], T0 + timedelta(minutes=1))
    assert not await store.use_recovery_code("ALICE", CODES[3], T0 + timedelta(minutes=2))
    assert await store.recovery_codes_left("alice") == 9
    assert (await store.mfa_state("alice")).recovery_codes_left == 9


async def test_codes_belong_to_their_user(store: SqlStore) -> None:
    await store.replace_recovery_codes("alice", CODES[:5], T0)
    await store.replace_recovery_codes("bob", CODES[5:], T0)
    assert not await store.use_recovery_code("bob", CODES[0], T0)
    assert not await store.use_recovery_code("alice", b"\x00" * 32, T0)
    assert await store.recovery_codes_left("alice") == 5
    assert await store.recovery_codes_left("carol") == 0


async def test_replacing_invalidates_every_earlier_code(store: SqlStore) -> None:
    await store.replace_recovery_codes("alice", CODES[:5], T0)
    await store.use_recovery_code("alice", CODES[0], T0)

    await store.replace_recovery_codes("alice", CODES[5:], T0 + timedelta(days=1))
    assert await store.recovery_codes_left("alice") == 5
    for old in CODES[:5]:
        assert not await store.use_recovery_code("alice", old, T0 + timedelta(days=1))
    assert await store.use_recovery_code("alice", CODES[5], T0 + timedelta(days=1))

    await store.replace_recovery_codes("alice", [], T0)
    assert await store.recovery_codes_left("alice") == 0


async def test_concurrent_use_of_one_code_succeeds_once(store: SqlStore, replica: SqlStore) -> None:
    await store.replace_recovery_codes("alice", CODES, T0)
    results = await asyncio.gather(
        *((store, replica)[i % 2].use_recovery_code("alice", CODES[0], T0) for i in range(10))
    )
    assert results.count(True) == 1
    assert await store.recovery_codes_left("alice") == 9


async def test_concurrent_regenerations_leave_one_set(store: SqlStore, replica: SqlStore) -> None:
    sets = [[bytes([n, i]) * 16 for i in range(10)] for n in range(6)]
    await asyncio.gather(
        *(
            (store, replica)[n % 2].replace_recovery_codes("alice", codes, T0)
            for n, codes in enumerate(sets)
        )
    )
    assert await store.recovery_codes_left("alice") == 10
    winners = [codes for codes in sets if await store.use_recovery_code("alice", codes[0], T0)]
    assert len(winners) == 1
