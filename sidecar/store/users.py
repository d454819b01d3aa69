"""Users as the sidecar has seen them, and their grace clocks (the ``UserStore``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, Select, case, func, select

from sidecar.store import schema
from sidecar.store.base import RekeyedUser, UserRecord
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
        async with self._db.transaction(write=True, operation="users.touch") as conn:
            await conn.execute(upsert)
            row = (
                (await conn.execute(_users_query().where(users.c.user_key == user_id)))
                .mappings()
                .one()
            )
        return _user(row)

    async def all(self) -> list[UserRecord]:
        async with self._db.transaction(write=False, operation="users.all") as conn:
            rows = await conn.execute(_users_query().order_by(schema.users.c.user_key))
            return [_user(row) for row in rows.mappings()]

    async def grace_started(self, user_id: str, now: datetime) -> datetime:
        grace = schema.grace
        query = select(grace.c.started_at).where(grace.c.user_key == user_id)
        async with self._db.transaction(write=False, operation="users.grace_started") as conn:
            started: datetime | None = (await conn.execute(query)).scalar_one_or_none()
        if started is not None:
            return started
        insert = (
            self._db.insert(grace)
            .values(user_key=user_id, started_at=now)
            .on_conflict_do_nothing(index_elements=[grace.c.user_key])
        )
        async with self._db.transaction(write=True, operation="users.grace_started") as conn:
            await conn.execute(insert)
            # A concurrent first call may have won the insert: everyone reads the winner's.
            won: datetime = (await conn.execute(query)).scalar_one()
        return won

    async def grace_starts(self) -> dict[str, datetime]:
        grace = schema.grace
        async with self._db.transaction(write=False, operation="users.grace_starts") as conn:
            rows = await conn.execute(select(grace.c.user_key, grace.c.started_at))
            return {row.user_key: row.started_at for row in rows}

    async def rekeyed(self) -> list[RekeyedUser]:
        table = schema.rekeyed_users
        async with self._db.transaction(write=False, operation="users.rekeyed") as conn:
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
