"""Verification lockout: attempts reserved per key before a secret is checked, in a fixed
window, then a ban; shared by replicas and exact under concurrency."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sidecar.store import LockoutStatus, Reservation, SqlStore

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
WINDOW = 900.0
BAN = 600.0
MAX = 5
PER_ADDRESS = 50
USER = "user:alice"
IP = "ip:203.0.113.9"
BOTH = {USER: MAX, IP: PER_ADDRESS}


async def reserve(
    store: SqlStore,
    limits: dict[str, int],
    at: datetime,
    *,
    window: float = WINDOW,
    ban: float = BAN,
) -> Reservation:
    return await store.lockout.reserve(limits, now=at, window_seconds=window, ban_seconds=ban)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def test_the_attempt_taking_the_last_slot_bans(store: SqlStore) -> None:
    for i in range(1, MAX):
        reservation = await reserve(store, BOTH, at(i))
        assert reservation.reserved
        assert reservation.status == LockoutStatus(None, i)
        assert reservation.attempts_left() == MAX - i
    assert await store.lockout.status([USER], at(MAX)) == LockoutStatus(None, MAX - 1)

    last = await reserve(store, BOTH, at(MAX))
    assert last.reserved
    assert last.banned_by_this
    assert last.status.locked_until == at(MAX + BAN)
    # The address has slots left, the user has none: refused, nothing counted anywhere.
    refused = await reserve(store, BOTH, at(MAX + 1))
    assert not refused.reserved
    assert refused.status.locked_until == at(MAX + BAN)
    assert (await store.lockout.status([IP], at(MAX + 1))).failures == MAX


async def test_the_ban_ends_and_counting_starts_over(store: SqlStore) -> None:
    for i in range(MAX):
        await reserve(store, {USER: MAX}, at(i))
    end = at(MAX - 1 + BAN)
    assert await store.lockout.status([USER], end) == LockoutStatus(None, 0)
    again = await reserve(store, {USER: MAX}, end)
    assert again.reserved
    assert again.status == LockoutStatus(None, 1)


async def test_attempts_outside_the_window_expire(store: SqlStore) -> None:
    for i in range(MAX - 1):
        await reserve(store, {USER: MAX}, at(i))
    assert await store.lockout.status([USER], at(WINDOW)) == LockoutStatus(None, 0)
    assert (await reserve(store, {USER: MAX}, at(WINDOW))).status == LockoutStatus(None, 1)


async def test_a_ban_longer_than_the_window_outlasts_it(store: SqlStore) -> None:
    for i in range(MAX):
        await reserve(store, {USER: MAX}, at(i), window=60, ban=3600)
    assert (await store.lockout.status([USER], at(120))).locked_until == at(MAX - 1 + 3600)
    assert not (await reserve(store, {USER: MAX}, at(120), window=60, ban=3600)).reserved


async def test_a_success_releases_its_attempt_but_not_earlier_failures(store: SqlStore) -> None:
    for i in range(3):
        await reserve(store, BOTH, at(i))  # three wrong codes
    right = await reserve(store, BOTH, at(10))
    await store.lockout.release(right)
    assert await store.lockout.status([USER], at(11)) == LockoutStatus(None, 3)
    # Only two more wrong ones fit in this window.
    assert (await reserve(store, BOTH, at(12))).reserved
    assert (await reserve(store, BOTH, at(13))).banned_by_this


async def test_a_success_on_the_last_slot_lifts_the_ban_it_set(store: SqlStore) -> None:
    for i in range(MAX - 1):
        await reserve(store, {USER: MAX}, at(i))
    last = await reserve(store, {USER: MAX}, at(10))
    assert last.banned_by_this
    await store.lockout.release(last)
    assert await store.lockout.status([USER], at(11)) == LockoutStatus(None, MAX - 1)
    assert (await reserve(store, {USER: MAX}, at(12))).reserved


async def test_a_release_in_a_later_window_changes_nothing(store: SqlStore) -> None:
    old = await reserve(store, {USER: MAX}, at(0))
    later = await reserve(store, {USER: MAX}, at(WINDOW + 1))
    await store.lockout.release(old)
    assert await store.lockout.status([USER], at(WINDOW + 2)) == LockoutStatus(None, 1)
    await store.lockout.release(later)
    assert await store.lockout.status([USER], at(WINDOW + 2)) == LockoutStatus(None, 0)


async def test_keys_count_independently_with_their_own_limits(store: SqlStore) -> None:
    # One address guessing across many users is banned as an address at its own limit...
    for i in range(PER_ADDRESS):
        assert (await reserve(store, {f"user:u{i}": MAX, IP: PER_ADDRESS}, at(i))).reserved
    assert not (await reserve(store, {"user:new": MAX, IP: PER_ADDRESS}, at(60))).reserved
    assert (await store.lockout.status([IP], at(61))).locked_until is not None
    # ...while each user there only failed once, and a user elsewhere is untouched.
    assert await store.lockout.status(["user:u0"], at(61)) == LockoutStatus(None, 1)
    assert (await reserve(store, {"user:u0": MAX, "ip:198.51.100.1": PER_ADDRESS}, at(62))).reserved


async def test_one_users_mistakes_never_lock_colleagues_behind_the_same_address(
    store: SqlStore,
) -> None:
    for i in range(MAX):
        await reserve(store, {"user:mallory": MAX, IP: PER_ADDRESS}, at(i))
    assert not (await reserve(store, {"user:mallory": MAX, IP: PER_ADDRESS}, at(10))).reserved
    assert (await reserve(store, {"user:kate": MAX, IP: PER_ADDRESS}, at(11))).reserved


async def test_concurrent_attempts_never_exceed_the_limit(
    store: SqlStore, replica: SqlStore
) -> None:
    results = await asyncio.gather(*(reserve((store, replica)[i % 2], BOTH, T0) for i in range(60)))
    assert sum(r.reserved for r in results) == MAX
    assert sum(r.banned_by_this for r in results) == 1
    assert (await store.lockout.status([IP], T0)).failures == MAX  # refused ones not counted


async def test_unknown_keys_are_not_locked(store: SqlStore) -> None:
    assert await store.lockout.status([], T0) == LockoutStatus(None, 0)
    assert await store.lockout.status(["user:nobody"], T0) == LockoutStatus(None, 0)
