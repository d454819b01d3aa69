"""Live security settings: one row, optimistic concurrency by version."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

from sidecar.store import SecuritySettings, SqlStore

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

SEED = SecuritySettings(
    mfa_policy="admins",
    grace_period_seconds=72 * 3600.0,
    ip_allowlist=("10.0.0.0/8", "2001:db8::/32"),
    ip_denylist=(),
    version=0,
    updated_by=None,
    updated_at=T0,
)


async def test_no_settings_until_seeded(store: SqlStore) -> None:
    assert await store.settings.current() is None
    assert await store.settings.version() == 0


async def test_save_round_trips_and_bumps_the_version(store: SqlStore) -> None:
    saved = await store.settings.save(SEED, expected_version=0)
    assert saved == dataclasses.replace(SEED, version=1)
    assert await store.settings.current() == saved
    assert await store.settings.version() == 1

    change = dataclasses.replace(
        SEED,
        mfa_policy="all",
        grace_period_seconds=1.5,
        ip_allowlist=(),
        ip_denylist=("203.0.113.0/24",),
        updated_by="alice",
        updated_at=T0 + timedelta(hours=1),
    )
    second = await store.settings.save(change, expected_version=1)
    assert second == dataclasses.replace(change, version=2)
    assert await store.settings.current() == second


async def test_a_save_from_a_stale_version_is_refused(store: SqlStore) -> None:
    assert await store.settings.save(SEED, expected_version=0) is not None
    assert await store.settings.save(SEED, expected_version=0) is None  # seeded already
    assert await store.settings.save(
        dataclasses.replace(SEED, mfa_policy="all"), expected_version=1
    )
    assert await store.settings.save(SEED, expected_version=1) is None
    assert await store.settings.save(SEED, expected_version=5) is None
    current = await store.settings.current()
    assert current is not None
    assert (current.mfa_policy, current.version) == ("all", 2)


async def test_concurrent_saves_from_one_version_one_wins(
    store: SqlStore, replica: SqlStore
) -> None:
    await store.settings.save(SEED, expected_version=0)
    edits = [dataclasses.replace(SEED, updated_by=f"admin{i}") for i in range(6)]
    results = await asyncio.gather(
        *((store, replica)[i % 2].settings.save(e, expected_version=1) for i, e in enumerate(edits))
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await replica.settings.current() == winners[0]


async def test_concurrent_seeding_one_wins(store: SqlStore, replica: SqlStore) -> None:
    results = await asyncio.gather(
        *(
            (store, replica)[i % 2].settings.save(
                dataclasses.replace(SEED, updated_by=f"r{i}"), expected_version=0
            )
            for i in range(4)
        )
    )
    assert sum(r is not None for r in results) == 1
    assert await store.settings.version() == 1


async def test_a_policy_change_removes_the_clocks_it_names_in_the_same_transaction(
    store: SqlStore,
) -> None:
    await store.settings.save(SEED, expected_version=0)
    for user in ("alice", "bob", "carol"):
        await store.users.grace_started(user, T0)
    stale = await store.settings.save(
        dataclasses.replace(SEED, mfa_policy="all"), expected_version=0, restart_grace=["alice"]
    )
    assert stale is None
    assert set(await store.users.grace_starts()) == {"alice", "bob", "carol"}  # nothing done
    saved = await store.settings.save(
        dataclasses.replace(SEED, mfa_policy="all"),
        expected_version=1,
        restart_grace=["alice", "carol", "nobody"],
    )
    assert saved is not None
    assert set(await store.users.grace_starts()) == {"bob"}
    later = T0 + timedelta(days=1)
    assert await store.users.grace_started("alice", later) == later


async def test_thousands_of_clocks_restart_at_once(store: SqlStore) -> None:
    await store.settings.save(SEED, expected_version=0)
    users = [f"u{i}" for i in range(2500)]
    for user in users[:50]:
        await store.users.grace_started(user, T0)
    saved = await store.settings.save(
        dataclasses.replace(SEED, mfa_policy="all"), expected_version=1, restart_grace=users
    )
    assert saved is not None
    assert await store.users.grace_starts() == {}
