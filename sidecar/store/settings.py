"""The live security settings row (``SettingsStore``): one row, versioned."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select, update

from sidecar.store import schema
from sidecar.store.base import SecuritySettings
from sidecar.store.db import Database
from sidecar.store.methods import json_list, tuple_of_str

_SETTINGS_ID = 1
_CHUNK = 500  # ids per DELETE ... IN (...): well under every driver's parameter limit


class SqlSettings:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def current(self) -> SecuritySettings | None:
        table = schema.security_settings
        async with self._db.transaction(write=False, operation="settings.current") as conn:
            row = (
                (await conn.execute(select(table).where(table.c.id == _SETTINGS_ID)))
                .mappings()
                .one_or_none()
            )
        if row is None:
            return None
        return SecuritySettings(
            mfa_policy=row["mfa_policy"],
            grace_period_seconds=float(row["grace_period_seconds"]),
            ip_allowlist=tuple_of_str(row["ip_allowlist"]),
            ip_denylist=tuple_of_str(row["ip_denylist"]),
            version=row["version"],
            updated_by=row["updated_by"],
            updated_at=row["updated_at"],
        )

    async def version(self) -> int:
        table = schema.security_settings
        async with self._db.transaction(write=False, operation="settings.version") as conn:
            version: int | None = (
                await conn.execute(select(table.c.version).where(table.c.id == _SETTINGS_ID))
            ).scalar_one_or_none()
        return version or 0

    async def save(
        self,
        new: SecuritySettings,
        *,
        expected_version: int,
        restart_grace: Sequence[str] = (),
    ) -> SecuritySettings | None:
        table = schema.security_settings
        version = expected_version + 1
        values = {
            "mfa_policy": new.mfa_policy,
            "grace_period_seconds": new.grace_period_seconds,
            "ip_allowlist": json_list(new.ip_allowlist),
            "ip_denylist": json_list(new.ip_denylist),
            "version": version,
            "updated_by": new.updated_by,
            "updated_at": new.updated_at,
        }
        if expected_version == 0:
            stmt: Any = (
                self._db.insert(table)
                .values(id=_SETTINGS_ID, **values)
                .on_conflict_do_nothing(index_elements=[table.c.id])
            )
        else:
            stmt = (
                update(table)
                .where(table.c.id == _SETTINGS_ID, table.c.version == expected_version)
                .values(**values)
            )
        grace = schema.grace
        async with self._db.transaction(write=True, operation="settings.save") as conn:
            if (await conn.execute(stmt)).rowcount != 1:
                return None
            users = list(dict.fromkeys(restart_grace))
            for start in range(0, len(users), _CHUNK):
                chunk = users[start : start + _CHUNK]
                await conn.execute(delete(grace).where(grace.c.user_key.in_(chunk)))
        return dataclasses.replace(new, version=version)
