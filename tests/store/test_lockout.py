"""Verification lockout: failures per key in a fixed window, then a ban; shared by replicas."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sidecar.store import LockoutStatus, SqlStore

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
WINDOW = 900.0
BAN = 600.0
MAX = 5
USER = "user:alice"
IP = "ip:203.0.113.9"


async def fail(store: SqlStore, keys: list[str], at: datetime) -> LockoutStatus:
    return await store.record_failure(
        keys, now=at, window_seconds=WINDOW, max_failures=MAX, ban_seconds=BAN
    )


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def test_the_fifth_failure_in_the_window_bans(store: SqlStore) -> None:
    for i in range(1, MAX):
        assert await fail(store, [USER, IP], at(i)) == LockoutStatus(None, i)
    assert await store.lockout_status([USER], at(MAX)) == LockoutStatus(None, MAX - 1)

    banned = await fail(store, [USER, IP], at(MAX))
    assert banned == LockoutStatus(at(MAX + BAN), MAX)
    assert await store.lockout_status([IP], at(MAX + 1)) == banned
    assert await store.lockout_status([USER, IP], at(MAX + BAN - 1)) == banned


async def test_the_ban_ends_and_counting_starts_over(store: SqlStore) -> None:
    for i in range(MAX):
        await fail(store, [USER], at(i))
    end = at(MAX - 1 + BAN)
    assert await store.lockout_status([USER], end) == LockoutStatus(None, 0)
    assert await fail(store, [USER], end) == LockoutStatus(None, 1)


async def test_failures_outside_the_window_expire(store: SqlStore) -> None:
    for i in range(MAX - 1):
        await fail(store, [USER], at(i))
    assert await store.lockout_status([USER], at(WINDOW)) == LockoutStatus(None, 0)
    # The window started with the first failure: the next one opens a new window.
    assert await fail(store, [USER], at(WINDOW)) == LockoutStatus(None, 1)
    assert await store.lockout_status([USER], at(WINDOW + 1)) == LockoutStatus(None, 1)


async def test_failures_during_a_ban_do_not_extend_it(store: SqlStore) -> None:
    for i in range(MAX):
        await fail(store, [USER], at(i))
    status = await fail(store, [USER], at(100))
    assert status.locked_until == at(MAX - 1 + BAN)
    assert status.failures == MAX + 1


async def test_a_ban_longer_than_the_window_outlasts_it(store: SqlStore) -> None:
    for i in range(MAX):
        await store.record_failure(
            [USER], now=at(i), window_seconds=60, max_failures=MAX, ban_seconds=3600
        )
    assert (await store.lockout_status([USER], at(120))).locked_until == at(MAX - 1 + 3600)
    status = await store.record_failure(
        [USER], now=at(120), window_seconds=60, max_failures=MAX, ban_seconds=3600
    )
    assert status.locked_until == at(MAX - 1 + 3600)


async def test_keys_count_independently(store: SqlStore) -> None:
    # One address guessing across many users is banned as an address ...
    for i in range(MAX):
        await fail(store, [f"user:u{i}", IP], at(i))
    assert (await store.lockout_status([IP], at(10))).locked_until is not None
    assert await store.lockout_status(["user:u0"], at(10)) == LockoutStatus(None, 1)
    # ... which holds for any user coming from it, and for no one coming from elsewhere.
    assert (await store.lockout_status(["user:bob", IP], at(10))).locked_until is not None
    assert await store.lockout_status(["user:bob", "ip:198.51.100.1"], at(10)) == LockoutStatus(
        None, 0
    )


async def test_clear_resets_only_the_given_keys(store: SqlStore) -> None:
    for i in range(MAX):
        await fail(store, [USER, IP], at(i))
    await store.clear_failures([USER])
    assert await store.lockout_status([USER], at(10)) == LockoutStatus(None, 0)
    assert (await store.lockout_status([IP], at(10))).locked_until is not None
    await store.clear_failures([])
    assert await store.lockout_status([], at(10)) == LockoutStatus(None, 0)


async def test_a_limit_of_one_bans_on_the_first_failure(store: SqlStore) -> None:
    status = await store.record_failure(
        [USER], now=T0, window_seconds=WINDOW, max_failures=1, ban_seconds=BAN
    )
    assert status == LockoutStatus(at(BAN), 1)


async def test_concurrent_failures_on_two_replicas_all_count(
    store: SqlStore, replica: SqlStore
) -> None:
    await asyncio.gather(
        *(fail((store, replica)[i % 2], [USER, f"ip:10.0.0.{i}"], at(i)) for i in range(12))
    )
    status = await store.lockout_status([USER], at(20))
    assert status.failures == 12
    # Set by whichever failure landed fifth, and not moved by the later ones.
    assert status.locked_until is not None
    assert at(BAN) <= status.locked_until <= at(11 + BAN)


async def test_rows_whose_window_and_ban_are_over_are_pruned(store: SqlStore) -> None:
    from sqlalchemy import func, select

    from sidecar.store import schema

    async def keys() -> int:
        async with store.engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(schema.lockout))).scalar()
        return int(count or 0)

    for n in range(3):
        await fail(store, [f"ip:198.51.100.{n}"], at(0))  # one-off failures
    for _ in range(MAX):  # banned for longer than the window
        await store.record_failure(
            [USER], now=at(0), window_seconds=WINDOW, max_failures=MAX, ban_seconds=WINDOW * 3
        )
    assert await keys() == 4
    # After the window: the one-off rows are gone; the ban (and its row) stays.
    await fail(store, [IP], at(WINDOW + 1))
    assert await keys() == 2
    assert (await store.lockout_status([USER], at(WINDOW + 1))).locked_until == at(WINDOW * 3)
