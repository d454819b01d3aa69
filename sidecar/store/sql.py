"""``SqlStore``: the ``Store`` on SQLAlchemy Core, one implementation for SQLite and PostgreSQL.

It owns the connection pool (``sidecar.store.db.Database``) and the schema's lifecycle
(versioned migrations, applied at start under a lock across processes); the tables are reached
by aggregate: ``users``, ``mfa``, ``lockout``, ``settings``, ``audit``, one module each.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from contextlib import closing, suppress
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, literal, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from sidecar.store import schema
from sidecar.store.audit import SqlAudit
from sidecar.store.base import StoreUnavailable
from sidecar.store.db import LOCK_MIGRATE, PG_CONNECT_TIMEOUT, Database, StoreObserver, async_url
from sidecar.store.lockout import SqlLockout
from sidecar.store.methods import SqlMfa
from sidecar.store.migrations import LATEST_VERSION, MIGRATIONS
from sidecar.store.settings import SqlSettings
from sidecar.store.users import SqlUsers

__all__ = ["SqlStore", "async_url"]


class SqlStore:
    """The store on SQLite (one host) or PostgreSQL (several replicas).

    ``schema`` (PostgreSQL only) puts the tables in that schema (it must exist), via the
    connections' ``search_path``; used to isolate tests or several sidecars in one database.
    ``connect_timeout`` bounds each new PostgreSQL connection (statements are bounded at
    10 s). Creating the store does not connect: ``migrate``/``ping`` do, at start.
    """

    def __init__(
        self,
        url: str | URL,
        encryption_key: str,
        *,
        schema: str | None = None,
        connect_timeout: float = PG_CONNECT_TIMEOUT,
    ) -> None:
        self._db = Database(url, encryption_key, schema=schema, connect_timeout=connect_timeout)
        self.users = SqlUsers(self._db)
        self.mfa = SqlMfa(self._db)
        self.lockout = SqlLockout(self._db)
        self.settings = SqlSettings(self._db)
        self.audit = SqlAudit(self._db)

    def observe(self, observer: StoreObserver) -> None:
        """Report availability changes and failed transactions to ``observer``."""
        self._db.observer = observer

    @property
    def engine(self) -> AsyncEngine:
        """The connection pool (exposed for diagnostics and tests)."""
        return self._db.engine

    async def migrate(self) -> None:
        if self._db.sqlite_file is not None:
            # The embedded default (/var/lib/sidecar/state.db) should work out of the box:
            # create the folder. When that fails, the connect below reports why.
            with suppress(OSError):
                self._db.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        async with self._db.transaction(write=True, operation="store.migrate") as conn:
            await self._db.lock(conn, LOCK_MIGRATE)
            await conn.run_sync(lambda sync: schema.schema_version.create(sync, checkfirst=True))
            current = (
                await conn.execute(select(func.max(schema.schema_version.c.version)))
            ).scalar_one_or_none() or 0
            if current > LATEST_VERSION:
                raise StoreUnavailable(
                    f"the database schema is version {current}, newer than this sidecar "
                    f"knows ({LATEST_VERSION}): upgrade the sidecar"
                )
            for step in MIGRATIONS:
                if step.version <= current:
                    continue
                await conn.run_sync(step.apply)
                await conn.execute(
                    schema.schema_version.insert().values(
                        version=step.version,
                        description=step.description,
                        applied_at=datetime.now(UTC),
                    )
                )

    async def schema_version(self) -> int:
        """The highest migration applied (0 on an empty database)."""
        async with self._db.transaction(write=False, operation="store.schema_version") as conn:
            exists = await conn.run_sync(
                lambda sync: sync.dialect.has_table(sync, schema.schema_version.name)
            )
            if not exists:
                return 0
            version = (
                await conn.execute(select(func.max(schema.schema_version.c.version)))
            ).scalar_one_or_none()
            return version or 0

    async def ping(self) -> None:
        async with self._db.transaction(write=False, operation="store.ping") as conn:
            await conn.execute(select(literal(1)))

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database file, or None on PostgreSQL."""
        return self._db.sqlite_file

    async def backup(self, target: Path) -> None:
        """Copy the live SQLite database to ``target`` as one consistent, self-contained file
        (SQLite's online backup: committed transactions, including those still in the
        write-ahead log, which a plain file copy misses), while the sidecar keeps running.
        Written beside ``target`` and renamed into place. PostgreSQL: ``ValueError`` (use
        pg_dump)."""
        source = self._db.sqlite_file
        if source is None:
            raise ValueError("PostgreSQL stores are backed up with pg_dump")
        await asyncio.to_thread(sqlite_backup, source, target)

    async def close(self) -> None:
        await self._db.close()


def sqlite_backup(source: Path, target: Path) -> None:
    """The online backup of ``source`` into ``target`` (see ``SqlStore.backup``)."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        with (
            closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as live,
            closing(sqlite3.connect(partial)) as copy,
        ):
            live.backup(copy)
            # One file, no -wal beside it: the copy is complete on its own.
            copy.execute("PRAGMA journal_mode = DELETE")
        os.replace(partial, target)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise StoreUnavailable(f"backup failed: {exc}") from exc
