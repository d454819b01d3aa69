"""Users as the sidecar has seen them, and their grace clocks (the ``UserStore``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, Select, case, func, select, update

from sidecar.store import schema
from sidecar.store.base import GraceEpochs, GraceRecord, RekeyedUser, UserRecord
from sidecar.store.db import Database


class SqlUsers:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def touch(
        self, user_id: str, *, email: str | None, role: str | None, now: datetime
    ) -> UserRecord:
        users = schema.users
        stmt = self._db.insert(users).values(
            user_key=user_id, email=email, role=role, first_seen=now, last_seen=now
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[users.c.user_key],
            set_={
                "email": stmt.excluded.email,
                "role": stmt.excluded.role,
                # Replicas' clocks differ a little: last_seen never moves backwards.
                "last_seen": case(
                    (stmt.excluded.last_seen > users.c.last_seen, stmt.excluded.last_seen),
                    else_=users.c.last_seen,
                ),
            },
        )
        async with self._db.transaction(write=True) as conn:
            await conn.execute(upsert)
            row = (
                (await conn.execute(_users_query().where(users.c.user_key == user_id)))
                .mappings()
                .one()
            )
        return _user(row)

    async def all(self) -> list[UserRecord]:
        async with self._db.transaction(write=False) as conn:
            rows = await conn.execute(_users_query().order_by(schema.users.c.user_key))
            return [_user(row) for row in rows.mappings()]

    async def grace_started(
        self, user_id: str, *, epochs: GraceEpochs, privileged: bool, now: datetime
    ) -> datetime:
        grace = schema.grace
        group = grace.c.admins_epoch if privileged else grace.c.members_epoch
        current = epochs.of(privileged)
        query = select(grace.c.started_at, group).where(grace.c.user_key == user_id)
        async with self._db.transaction(write=False) as conn:
            row = (await conn.execute(query)).one_or_none()
        # A clock from an older epoch of the user's group was lifted or newly imposed since;
        # a clock from a newer one was written by a replica that saw a newer policy first.
        if row is not None and row[1] >= current:
            started: datetime = row[0]
            return started
        values = {
            "started_at": now,
            "admins_epoch": epochs.admins,
            "members_epoch": epochs.members,
        }
        async with self._db.transaction(write=True) as conn:
            if row is None:
                await conn.execute(
                    self._db.insert(grace)
                    .values(user_key=user_id, **values)
                    .on_conflict_do_nothing(index_elements=[grace.c.user_key])
                )
            else:
                # Only over the clock read above: a concurrent restart wins once.
                await conn.execute(
                    update(grace)
                    .where(grace.c.user_key == user_id, group < current)
                    .values(**values)
                )
            # Whoever won, everyone reads the one start now stored.
            started = (await conn.execute(query)).one()[0]
        return started

    async def grace_records(self) -> dict[str, GraceRecord]:
        grace = schema.grace
        async with self._db.transaction(write=False) as conn:
            rows = await conn.execute(select(grace))
            return {
                row.user_key: GraceRecord(
                    row.started_at, GraceEpochs(row.admins_epoch, row.members_epoch)
                )
                for row in rows
            }

    async def rekeyed(self) -> list[RekeyedUser]:
        table = schema.rekeyed_users
        async with self._db.transaction(write=False) as conn:
            rows = await conn.execute(select(table).order_by(table.c.old_key))
            return [RekeyedUser(r.old_key, r.new_id, r.rekeyed_at) for r in rows]


def _users_query() -> Select[Any]:
    users, mfa = schema.users, schema.user_mfa
    return select(
        *users.c, func.coalesce(mfa.c.mfa_generation, 0).label("mfa_generation")
    ).select_from(users.outerjoin(mfa, mfa.c.user_key == users.c.user_key))


def _user(row: RowMapping) -> UserRecord:
    return UserRecord(
        user_id=row["user_key"],
        email=row["email"],
        role=row["role"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        mfa_generation=row["mfa_generation"],
    )
