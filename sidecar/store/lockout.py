"""Verification lockout counters, shared by replicas (``LockoutStore``).

One row per counted key (``user:<id>``, ``ip:<address>``): a fixed window that opens at the
key's first attempt (its end fixed then, from the window length configured at the time), the
attempts counted in it, and the end of the ban once the count reached the key's limit.

An attempt is reserved *before* its secret is checked, by one conditional upsert per key in
one transaction: the row is counted only when the key is not banned and has a slot left, so
at most ``limit`` secrets are ever checked per key and window, whatever the concurrency and on
any replica (the row lock, or SQLite's single writer, orders the upserts). The attempt taking
the last slot bans the key at once; if it then succeeds, ``release`` uncounts it and lifts
that ban. Reading the count and then writing it (the earlier design) let 300 concurrent
guesses all be checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, case, delete, literal, not_, null, or_, select
from sqlalchemy import update as sql_update

from sidecar.store import schema
from sidecar.store.base import LockoutStatus, Reservation, ReservedKey
from sidecar.store.db import Database


class _Refused(Exception):
    """A key had no slot left: roll back every key's count of this attempt."""


class SqlLockout:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def status(self, keys: list[str], now: datetime) -> LockoutStatus:
        if not keys:
            return LockoutStatus(locked_until=None, failures=0)
        lockout = schema.lockout
        async with self._db.transaction(write=False, operation="lockout.status") as conn:
            rows = (
                await conn.execute(select(lockout).where(lockout.c.key.in_(sorted(set(keys)))))
            ).all()
        return _strictest(rows, now)

    async def reserve(
        self,
        limits: Mapping[str, int],
        *,
        now: datetime,
        window_seconds: float,
        ban_seconds: float,
    ) -> Reservation:
        lockout = schema.lockout
        window_end = now + timedelta(seconds=window_seconds)
        ban_until = now + timedelta(seconds=ban_seconds)

        def at(value: datetime | None) -> ColumnElement[Any]:
            return literal(value, schema.UtcDateTime())

        banned = and_(lockout.c.locked_until.is_not(None), lockout.c.locked_until > now)
        # A new window starts when the old one ran out or a served ban ended it (a ban
        # outlasting its window is not lifted by the window's end).
        fresh = and_(
            not_(banned),
            or_(lockout.c.window_end <= now, lockout.c.locked_until.is_not(None)),
        )
        reserved: list[ReservedKey] = []
        try:
            async with self._db.transaction(write=True, operation="lockout.reserve") as conn:
                # Keys in a fixed order, so that concurrent callers on PostgreSQL take the
                # row locks in the same order (no deadlock).
                for key in sorted(limits):
                    limit = limits[key]
                    first_ban = ban_until if limit <= 1 else None
                    stmt = (
                        self._db.insert(lockout)
                        .values(
                            key=key,
                            window_start=now,
                            window_end=window_end,
                            failures=1,
                            locked_until=first_ban,
                        )
                        .on_conflict_do_update(
                            index_elements=[lockout.c.key],
                            set_={
                                "window_start": case(
                                    (fresh, at(now)), else_=lockout.c.window_start
                                ),
                                "window_end": case(
                                    (fresh, at(window_end)), else_=lockout.c.window_end
                                ),
                                "failures": case((fresh, literal(1)), else_=lockout.c.failures + 1),
                                "locked_until": case(
                                    (fresh, at(first_ban)),
                                    (lockout.c.failures + 1 >= limit, at(ban_until)),
                                    else_=null(),
                                ),
                            },
                            # The whole rule, against the row as it is when this runs: no
                            # slot left (or banned) means no update, and no row returned.
                            where=or_(fresh, and_(not_(banned), lockout.c.failures < limit)),
                        )
                        .returning(lockout.c.window_start, lockout.c.failures)
                    )
                    row = (await conn.execute(stmt)).one_or_none()
                    if row is None:
                        raise _Refused
                    reserved.append(
                        ReservedKey(
                            key=key,
                            window_start=row.window_start,
                            failures=row.failures,
                            limit=limit,
                            banned_by_this=row.failures >= limit,
                        )
                    )
        except _Refused:
            return Reservation(False, await self._refusal(limits, now))
        await self._prune(now)
        failures = max((k.failures for k in reserved), default=0)
        locked = [k for k in reserved if k.banned_by_this]
        return Reservation(
            True,
            LockoutStatus(ban_until if locked else None, failures),
            tuple(reserved),
        )

    async def release(self, reservation: Reservation) -> None:
        if not reservation.reserved:
            return
        lockout = schema.lockout
        async with self._db.transaction(write=True, operation="lockout.release") as conn:
            for reserved in sorted(reservation.keys, key=lambda k: k.key):
                remaining = lockout.c.failures - 1
                await conn.execute(
                    sql_update(lockout)
                    .where(
                        lockout.c.key == reserved.key,
                        # Only in the window it was counted in: a new window owes it nothing.
                        lockout.c.window_start == reserved.window_start,
                        lockout.c.failures > 0,
                    )
                    .values(
                        failures=remaining,
                        locked_until=case(
                            (remaining < reserved.limit, null()), else_=lockout.c.locked_until
                        ),
                    )
                )

    async def _refusal(self, limits: Mapping[str, int], now: datetime) -> LockoutStatus:
        """Why a reservation was refused: the ban, or (a limit lowered by a reload below a
        running count) the end of the window holding the full count."""
        lockout = schema.lockout
        async with self._db.transaction(write=False, operation="lockout.refusal") as conn:
            rows = (
                await conn.execute(select(lockout).where(lockout.c.key.in_(sorted(limits))))
            ).all()
        status = _strictest(rows, now)
        if status.locked_until is not None:
            return status
        full = [r.window_end for r in rows if r.failures >= limits[r.key] and r.window_end > now]
        return LockoutStatus(max(full, default=now), status.failures)

    async def _prune(self, now: datetime) -> None:
        # Rows whose window and ban are both over count for nothing (an upsert starts afresh
        # on them): prune them, in a transaction of their own (no lock interleaving with the
        # upserts), so the table does not grow with every address that ever failed once.
        lockout = schema.lockout
        async with self._db.transaction(write=True, operation="lockout.prune") as conn:
            await conn.execute(
                delete(lockout).where(
                    lockout.c.window_end <= now,
                    or_(lockout.c.locked_until.is_(None), lockout.c.locked_until <= now),
                )
            )


def _strictest(rows: Sequence[Row[Any]], now: datetime) -> LockoutStatus:
    """The latest ban still running and the most attempts inside a current window."""
    locked_until: datetime | None = None
    failures = 0
    for row in rows:
        banned = row.locked_until is not None and row.locked_until > now
        if banned:
            locked_until = (
                row.locked_until if locked_until is None else max(locked_until, row.locked_until)
            )
        if banned or (row.locked_until is None and row.window_end > now):
            failures = max(failures, row.failures)
    return LockoutStatus(locked_until=locked_until, failures=failures)
