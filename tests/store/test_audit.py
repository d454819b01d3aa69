"""The audit trail in the store: sequential, hash-chained, serialized across replicas."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from sidecar.store import AuditEntry, SqlStore
from sidecar.store import schema as tables
from sidecar.store.chain import GENESIS, record_hash, verify_chain

T0 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


async def append(store: SqlStore, i: int, action: str = "mfa.verify", **changes: str) -> AuditEntry:
    fields = {
        "actor": f"user{i % 3}",
        "client_ip": "203.0.113.9",
        "target": None,
        "outcome": "success",
        "details": json.dumps({"i": i}),
    }
    fields.update(changes)
    return await store.audit.append(
        time=T0 + timedelta(seconds=i),
        action=action,
        **fields,  # type: ignore[arg-type]
    )


async def test_records_are_numbered_and_chained(store: SqlStore) -> None:
    first = await append(store, 0)
    second = await append(store, 1, target="bob", outcome="failure")
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS
    assert second.prev_hash == first.hash
    assert second.hash == record_hash(
        first.hash,
        2,
        second.time,
        "user1",
        "203.0.113.9",
        "mfa.verify",
        "bob",
        "failure",
        '{"i": 1}',
    )
    assert await store.audit.all() == [first, second]
    assert verify_chain([first, second]) is None


async def test_times_round_trip_exactly_in_utc(store: SqlStore) -> None:
    local = datetime(2030, 6, 1, 14, 30, 0, 999999, tzinfo=timezone(timedelta(hours=2)))
    entry = await store.audit.append(
        time=local,
        actor=None,
        client_ip=None,
        action="config.reload",
        target=None,
        outcome="success",
        details="{}",
    )
    assert entry.time == local
    assert entry.time.tzinfo == UTC
    (stored,) = await store.audit.all()
    assert stored == entry
    assert verify_chain([stored]) is None


async def test_naive_times_are_refused(store: SqlStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.audit.append(
            time=datetime(2030, 1, 1),
            actor=None,
            client_ip=None,
            action="x",
            target=None,
            outcome="success",
            details="{}",
        )
    assert await store.audit.all() == []


async def test_concurrent_appends_from_two_replicas_keep_one_chain(
    store: SqlStore, replica: SqlStore
) -> None:
    entries = await asyncio.gather(*(append((store, replica)[i % 2], i) for i in range(30)))
    assert sorted(e.seq for e in entries) == list(range(1, 31))
    stored = await replica.audit.all()
    assert [e.seq for e in stored] == list(range(1, 31))
    assert verify_chain(stored) is None
    assert sorted(stored, key=lambda e: e.seq) == sorted(entries, key=lambda e: e.seq)


async def test_an_edited_record_breaks_the_chain(store: SqlStore) -> None:
    for i in range(5):
        await append(store, i)
    async with store.engine.begin() as conn:
        await conn.execute(
            update(tables.audit).where(tables.audit.c.seq == 3).values(outcome="failure")
        )
    assert verify_chain(await store.audit.all()) == 3


async def test_entries_newest_first_with_filters(store: SqlStore) -> None:
    for i in range(10):
        await append(store, i, action="mfa.verify" if i % 2 else "ip.blocked")

    assert [e.seq for e in await store.audit.entries(limit=3)] == [10, 9, 8]
    assert [e.seq for e in await store.audit.entries(limit=3, before_seq=8)] == [7, 6, 5]
    assert [e.seq for e in await store.audit.entries(limit=10, action="ip.blocked")] == [
        9,
        7,
        5,
        3,
        1,
    ]
    assert [e.seq for e in await store.audit.entries(limit=10, actor="user0")] == [10, 7, 4, 1]
    assert [
        e.seq
        for e in await store.audit.entries(
            limit=10, action="mfa.verify", actor="user1", before_seq=8
        )
    ] == [2]
    assert await store.audit.entries(limit=0) == []
