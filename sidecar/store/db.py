"""The database plumbing every aggregate shares: the engine, transactions, dialect helpers.

Both dialects run the same schema and the same statements. The dialect-specific parts are
few and kept here: the ``INSERT ... ON CONFLICT`` construct (each dialect has its own),
cross-process locks (``pg_advisory_xact_lock`` on PostgreSQL; on SQLite, write transactions
start with ``BEGIN IMMEDIATE``, which takes the database's single write lock up front) and the
connection setup.

Every database failure leaves through :meth:`Database.transaction` as ``StoreUnavailable``;
the connection pool replaces dead connections (``pool_pre_ping``), so the store recovers by
itself when the database does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import Table, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, DisconnectionError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from sidecar.breaker import CircuitBreaker
from sidecar.store.base import StoreUnavailable

# Everything a database or its driver raises when it cannot answer: SQLAlchemy's wrapped
# DBAPI errors, pool timeouts, and what drivers raise unwrapped while connecting (refused
# or timed-out sockets are OSError; asyncpg raises its own errors from ``connect``).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    DBAPIError,
    DisconnectionError,
    PoolTimeoutError,
    OSError,  # includes TimeoutError (asyncio.TimeoutError on 3.11)
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

# pg_advisory_xact_lock(class, key) classes; the key is a hash of the schema name (and of the
# user for per-user locks), so stores in different schemas of one database do not contend.
LOCK_MIGRATE = 0x51DEC0
LOCK_AUDIT = 0x51DEC1
LOCK_USER_MFA = 0x51DEC2

PG_CONNECT_TIMEOUT = 3.0
PG_COMMAND_TIMEOUT = 10.0
SQLITE_BUSY_TIMEOUT = 5.0


def async_url(url: str | URL) -> URL:
    """Map a ``storage.url`` onto its async driver (``sqlite`` -> ``sqlite+aiosqlite``,
    ``postgresql``/``postgres`` -> ``postgresql+asyncpg``); other schemes are refused."""
    parsed = make_url(url) if isinstance(url, str) else url
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "aiosqlite"):
        database = parsed.database or ""
        if not database or ":memory:" in database or parsed.query.get("mode") == "memory":
            # Every pooled connection would see its own empty database (or all would share one
            # connection and its transaction): use a file, e.g. under the test's tmp_path.
            raise ValueError("storage.url: in-memory SQLite is not supported, give a file path")
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres") and driver in ("", "asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(
        f"storage.url: unsupported database {parsed.drivername!r} "
        "(use sqlite:///path or postgresql://...)"
    )


class StoreObserver:
    """What the store reports about itself (the app plugs metrics and logs in); does
    nothing by default."""

    def store_up(self, up: bool) -> None:
        """The database became reachable (True) or unreachable (False)."""

    def store_error(self, operation: str, kind: str) -> None:
        """A transaction of ``operation`` failed: ``unreachable``, ``error`` (the database
        answered with one) or ``circuit_open`` (failed fast)."""


def _unreachable(error: BaseException) -> bool:
    """Whether the database could not be reached (what opens the breaker), rather than
    answering a statement with an error."""
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig if error.orig is not None else error
    if isinstance(error, sqlite3.OperationalError):
        # "unable to open database file", "disk I/O error"; not "database is locked" (a busy
        # writer: the database is there).
        message = str(error).lower()
        return "unable to open" in message or "disk i/o" in message
    return isinstance(
        error,
        (
            OSError,  # refused, unreachable, timed out
            DisconnectionError,
            PoolTimeoutError,
            asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError,
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.TooManyConnectionsError,
        ),
    )


def describe_error(error: BaseException) -> str:
    """A one-line reason without SQL or parameters (which may hold secrets)."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    reason = type(cause).__name__ + (f": {message[:200]}" if message else "")
    return f"database unavailable ({reason})"


class Database:
    """One connection pool and the helpers the aggregates' statements need.

    ``schema`` (PostgreSQL only) puts the tables in that schema (it must exist), via the
    connections' ``search_path``. ``connect_timeout`` bounds each new PostgreSQL connection
    (statements are bounded at 10 s). Creating it does not connect.
    """

    engine: AsyncEngine

    def __init__(
        self,
        url: str | URL,
        encryption_key: str,
        *,
        schema: str | None = None,
        connect_timeout: float = PG_CONNECT_TIMEOUT,
    ) -> None:
        self._fernet = Fernet(encryption_key)
        self.observer: StoreObserver = StoreObserver()
        self.breaker = CircuitBreaker("store", on_change=lambda up: self.observer.store_up(up))
        target = async_url(url)
        self.postgres = target.drivername.startswith("postgresql")
        # Serializes this process's SQLite writers so they queue here instead of polling the
        # file lock; other processes are kept out by BEGIN IMMEDIATE.
        self._sqlite_write_lock: asyncio.Lock | None = None
        self.sqlite_file: Path | None = None
        if self.postgres:
            server_settings = {"application_name": "sidecar"}
            if schema is not None:
                server_settings["search_path"] = schema
            self.engine = create_async_engine(
                target,
                hide_parameters=True,
                pool_pre_ping=True,
                pool_timeout=connect_timeout + 2,
                connect_args={
                    "timeout": connect_timeout,
                    "command_timeout": PG_COMMAND_TIMEOUT,
                    "server_settings": server_settings,
                },
            )
            self._write_engine = self.engine
        else:
            if schema is not None:
                raise ValueError("a schema can only be given for PostgreSQL")
            self.engine = create_async_engine(
                target, hide_parameters=True, connect_args={"timeout": SQLITE_BUSY_TIMEOUT}
            )
            _configure_sqlite(self.engine)
            self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
            if target.database and target.database != ":memory:":
                self.sqlite_file = Path(target.database)
            self._sqlite_write_lock = asyncio.Lock()

    @asynccontextmanager
    async def transaction(
        self, *, write: bool, operation: str = "other"
    ) -> AsyncIterator[AsyncConnection]:
        """One transaction; any database failure inside it becomes ``StoreUnavailable``.
        Any other exception rolls it back and propagates unchanged.

        Behind the circuit breaker: after a failure to reach the database, transactions
        fail fast (``StoreUnavailable``, no connection attempt) until the backoff allows one
        probe; ``operation`` names the caller in the error counter."""
        if not self.breaker.allow():
            self.observer.store_error(operation, "circuit_open")
            raise StoreUnavailable(
                f"database unavailable (retried in {self.breaker.retry_in():.1f}s)"
            )
        local: AbstractAsyncContextManager[object] = (
            self._sqlite_write_lock
            if write and self._sqlite_write_lock is not None
            else nullcontext()
        )
        try:
            async with local, (self._write_engine if write else self.engine).begin() as conn:
                yield conn
        except DATABASE_ERRORS as error:
            unreachable = _unreachable(error)
            if unreachable:
                self.breaker.failure()
            else:
                self.breaker.success()  # it answered: with an error, but it is there
            self.observer.store_error(operation, "unreachable" if unreachable else "error")
            raise StoreUnavailable(describe_error(error)) from error
        except StatementError as error:
            self.breaker.success()
            # A value the statement could not take (a naive datetime): the caller's bug,
            # reported as the ValueError it is rather than as a database failure.
            if isinstance(error.orig, ValueError):
                raise error.orig from None
            raise
        except BaseException:
            # Not the database's doing (a refused reservation, a cancelled request): if this
            # call was the probe, let another go.
            self.breaker.release()
            raise
        else:
            self.breaker.success()

    def insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """The dialect's INSERT, which carries ``on_conflict_do_*``."""
        return postgresql.insert(table) if self.postgres else sqlite.insert(table)

    async def lock(self, conn: AsyncConnection, lock_class: int, key: str = "") -> None:
        """Hold a PostgreSQL advisory lock until the transaction ends (no-op on SQLite, where
        write transactions already hold the database's write lock)."""
        if self.postgres:
            await conn.execute(
                text(
                    "SELECT pg_advisory_xact_lock(:cls,"
                    " hashtext(coalesce(current_schema(), '') || ':' || :key))"
                ),
                {"cls": lock_class, "key": key},
            )

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise StoreUnavailable(
                "cannot decrypt a stored TOTP secret: storage.encryption_key is not the key "
                "it was written with"
            ) from None

    async def close(self) -> None:
        await self.engine.dispose()


def _enable_wal(cursor: Any) -> None:
    """Switch a new database to WAL. The switch takes an exclusive lock without waiting on
    the busy timeout, so processes opening a fresh file at once retry it briefly; WAL is
    persistent, so a database already in WAL mode is left alone."""
    cursor.execute("PRAGMA journal_mode")
    row = cursor.fetchone()
    if row is not None and str(row[0]).lower() == "wal":
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _configure_sqlite(engine: AsyncEngine) -> None:
    """WAL (readers never block the writer), a busy timeout, foreign keys, and SQLAlchemy in
    charge of BEGIN so that write transactions can be ``BEGIN IMMEDIATE``."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # The driver's own implicit BEGIN would defer the write lock to the first write,
        # which fails a read-then-write transaction instead of waiting (SQLITE_BUSY_SNAPSHOT).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
