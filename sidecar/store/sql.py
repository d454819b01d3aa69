"""``SqlStore``: the ``Store`` on SQLAlchemy Core, one implementation for SQLite and PostgreSQL.

Both dialects run the same schema and the same statements. The dialect-specific parts are
few and kept here: the ``INSERT ... ON CONFLICT`` construct (each dialect has its own),
cross-process locks (``pg_advisory_xact_lock`` on PostgreSQL; on SQLite, write transactions
start with ``BEGIN IMMEDIATE``, which takes the database's single write lock up front) and the
connection setup.

Single-use operations are single conditional statements whose row count (or ``RETURNING``)
decides the winner, so they hold across replicas without application locks. Every database
failure leaves through ``_transaction`` as ``StoreUnavailable``; the connection pool replaces
dead connections (``pool_pre_ping``), so the store recovers by itself when the database does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import (
    ColumnElement,
    Row,
    RowMapping,
    Select,
    Table,
    and_,
    case,
    delete,
    event,
    func,
    literal,
    not_,
    null,
    or_,
    select,
    text,
    union,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, DisconnectionError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from sidecar.store import chain, schema
from sidecar.store.base import (
    AuditEntry,
    LockoutStatus,
    MfaState,
    PasskeyRecord,
    SecuritySettings,
    StoreUnavailable,
    TotpRecord,
    UserRecord,
    user_key,
)
from sidecar.store.migrations import LATEST_VERSION, MIGRATIONS

# Everything a database or its driver raises when it cannot answer: SQLAlchemy's wrapped
# DBAPI errors, pool timeouts, and what drivers raise unwrapped while connecting (refused
# or timed-out sockets are OSError; asyncpg raises its own errors from ``connect``).
_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
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
_LOCK_MIGRATE = 0x51DEC0
_LOCK_AUDIT = 0x51DEC1
_LOCK_RECOVERY_CODES = 0x51DEC2

_SETTINGS_ID = 1
_HANDLE_BYTES = 32
_PG_CONNECT_TIMEOUT = 3.0
_PG_COMMAND_TIMEOUT = 10.0
_SQLITE_BUSY_TIMEOUT = 5.0


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


def _describe(error: BaseException) -> str:
    """A one-line reason without SQL or parameters (which may hold secrets)."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    reason = type(cause).__name__ + (f": {message[:200]}" if message else "")
    return f"database unavailable ({reason})"


def _json_list(values: Iterable[str]) -> str:
    return json.dumps(list(values), separators=(",", ":"))


def _tuple_of_str(raw: str) -> tuple[str, ...]:
    values = json.loads(raw)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise StoreUnavailable("corrupt list column in the store")
    return tuple(values)


class SqlStore:
    """The store on SQLite (one host) or PostgreSQL (several replicas).

    ``schema`` (PostgreSQL only) puts the tables in that schema (it must exist), via the
    connections' ``search_path``; used to isolate tests or several sidecars in one database.
    ``connect_timeout`` bounds each new PostgreSQL connection (statements are bounded at
    10 s). Creating the store does not connect: ``migrate``/``ping`` do, at start.
    """

    engine: AsyncEngine
    """The connection pool (exposed for diagnostics and tests)."""

    def __init__(
        self,
        url: str | URL,
        encryption_key: str,
        *,
        schema: str | None = None,
        connect_timeout: float = _PG_CONNECT_TIMEOUT,
    ) -> None:
        self._fernet = Fernet(encryption_key)
        target = async_url(url)
        self._postgres = target.drivername.startswith("postgresql")
        # Serializes this process's SQLite writers so they queue here instead of polling the
        # file lock; other processes are kept out by BEGIN IMMEDIATE.
        self._sqlite_write_lock: asyncio.Lock | None = None
        self._sqlite_file: Path | None = None
        if self._postgres:
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
                    "command_timeout": _PG_COMMAND_TIMEOUT,
                    "server_settings": server_settings,
                },
            )
            self._write_engine = self.engine
        else:
            if schema is not None:
                raise ValueError("a schema can only be given for PostgreSQL")
            self.engine = create_async_engine(
                target, hide_parameters=True, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT}
            )
            _configure_sqlite(self.engine)
            self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
            if target.database and target.database != ":memory:":
                self._sqlite_file = Path(target.database)
            self._sqlite_write_lock = asyncio.Lock()

    # plumbing ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """One transaction; any database failure inside it becomes ``StoreUnavailable``."""
        local: AbstractAsyncContextManager[object] = (
            self._sqlite_write_lock
            if write and self._sqlite_write_lock is not None
            else nullcontext()
        )
        try:
            async with local, (self._write_engine if write else self.engine).begin() as conn:
                yield conn
        except _DATABASE_ERRORS as error:
            raise StoreUnavailable(_describe(error)) from error
        except StatementError as error:
            # A value the statement could not take (a naive datetime): the caller's bug,
            # reported as the ValueError it is rather than as a database failure.
            if isinstance(error.orig, ValueError):
                raise error.orig from None
            raise

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """The dialect's INSERT, which carries ``on_conflict_do_*``."""
        return postgresql.insert(table) if self._postgres else sqlite.insert(table)

    async def _pg_lock(self, conn: AsyncConnection, lock_class: int, key: str = "") -> None:
        """Hold a PostgreSQL advisory lock until the transaction ends (no-op on SQLite, where
        write transactions already hold the database's write lock)."""
        if self._postgres:
            await conn.execute(
                text(
                    "SELECT pg_advisory_xact_lock(:cls,"
                    " hashtext(coalesce(current_schema(), '') || ':' || :key))"
                ),
                {"cls": lock_class, "key": key},
            )

    def _encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode("utf-8")).decode("ascii")

    def _decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise StoreUnavailable(
                "cannot decrypt a stored TOTP secret: storage.encryption_key is not the key "
                "it was written with"
            ) from None

    # lifecycle --------------------------------------------------------------------------

    async def migrate(self) -> None:
        if self._sqlite_file is not None:
            # The embedded default (/var/lib/sidecar/state.db) should work out of the box:
            # create the folder. When that fails, the connect below reports why.
            with suppress(OSError):
                self._sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        async with self._transaction(write=True) as conn:
            await self._pg_lock(conn, _LOCK_MIGRATE)
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
        async with self._transaction(write=False) as conn:
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
        async with self._transaction(write=False) as conn:
            await conn.execute(select(literal(1)))

    async def close(self) -> None:
        await self.engine.dispose()

    # users and grace --------------------------------------------------------------------

    async def touch_user(
        self, user_id: str, *, email: str | None, role: str | None, now: datetime
    ) -> UserRecord:
        users = schema.users
        stmt = self._insert(users).values(
            user_key=user_key(user_id),
            display_id=user_id,
            email=email,
            role=role,
            first_seen=now,
            last_seen=now,
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[users.c.user_key],
            set_={
                "display_id": stmt.excluded.display_id,
                "email": stmt.excluded.email,
                "role": stmt.excluded.role,
                # Replicas' clocks differ a little: last_seen never moves backwards.
                "last_seen": case(
                    (stmt.excluded.last_seen > users.c.last_seen, stmt.excluded.last_seen),
                    else_=users.c.last_seen,
                ),
            },
        )
        async with self._transaction(write=True) as conn:
            await conn.execute(upsert)
            row = (
                (await conn.execute(_users_query().where(users.c.user_key == user_key(user_id))))
                .mappings()
                .one()
            )
        return _user(row)

    async def list_users(self) -> list[UserRecord]:
        async with self._transaction(write=False) as conn:
            rows = await conn.execute(_users_query().order_by(schema.users.c.user_key))
            return [_user(row) for row in rows.mappings()]

    async def grace_started(self, user_id: str, epoch: int, now: datetime) -> datetime:
        key = user_key(user_id)
        grace = schema.grace
        query = select(grace.c.started_at).where(grace.c.user_key == key, grace.c.epoch == epoch)
        async with self._transaction(write=False) as conn:
            started: datetime | None = (await conn.execute(query)).scalar_one_or_none()
        if started is not None:
            return started
        insert = (
            self._insert(grace)
            .values(user_key=key, epoch=epoch, started_at=now)
            .on_conflict_do_nothing(index_elements=[grace.c.user_key, grace.c.epoch])
        )
        async with self._transaction(write=True) as conn:
            await conn.execute(insert)
            # A concurrent first call may have won the insert: everyone reads the winner's.
            started = (await conn.execute(query)).scalar_one()
        assert started is not None
        return started

    async def grace_starts(self, epoch: int) -> dict[str, datetime]:
        grace = schema.grace
        async with self._transaction(write=False) as conn:
            rows = await conn.execute(
                select(grace.c.user_key, grace.c.started_at).where(grace.c.epoch == epoch)
            )
            return {row.user_key: row.started_at for row in rows}

    async def mfa_state(self, user_id: str) -> MfaState:
        key = user_key(user_id)
        t, p, r, u = schema.totp, schema.passkeys, schema.recovery_codes, schema.user_mfa
        query = select(
            select(func.count()).select_from(t).where(t.c.user_key == key).scalar_subquery(),
            select(func.count()).select_from(p).where(p.c.user_key == key).scalar_subquery(),
            select(func.count())
            .select_from(r)
            .where(r.c.user_key == key, r.c.used_at.is_(None))
            .scalar_subquery(),
            select(u.c.mfa_generation).where(u.c.user_key == key).scalar_subquery(),
        )
        async with self._transaction(write=False) as conn:
            has_totp, passkeys, codes, generation = (await conn.execute(query)).one()
        return MfaState(
            totp=bool(has_totp),
            passkeys=int(passkeys),
            recovery_codes_left=int(codes),
            mfa_generation=int(generation or 0),
        )

    async def enrolled_user_keys(self) -> set[str]:
        t, p = schema.totp, schema.passkeys
        query = union(select(t.c.user_key), select(p.c.user_key))
        async with self._transaction(write=False) as conn:
            return {row[0] for row in await conn.execute(query)}

    async def bump_mfa_generation(self, user_id: str) -> int:
        mfa = schema.user_mfa
        stmt = (
            self._insert(mfa)
            .values(user_key=user_key(user_id), mfa_generation=1, webauthn_handle=None)
            .on_conflict_do_update(
                index_elements=[mfa.c.user_key],
                set_={"mfa_generation": mfa.c.mfa_generation + 1},
            )
            .returning(mfa.c.mfa_generation)
        )
        async with self._transaction(write=True) as conn:
            generation: int = (await conn.execute(stmt)).scalar_one()
        return generation

    # TOTP -------------------------------------------------------------------------------

    async def set_pending_totp(self, user_id: str, secret: str, now: datetime) -> None:
        pending = schema.pending_totp
        stmt = self._insert(pending).values(
            user_key=user_key(user_id), secret_encrypted=self._encrypt(secret), created_at=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[pending.c.user_key],
            set_={
                "secret_encrypted": stmt.excluded.secret_encrypted,
                "created_at": stmt.excluded.created_at,
            },
        )
        async with self._transaction(write=True) as conn:
            await conn.execute(stmt)

    async def pending_totp(self, user_id: str) -> str | None:
        pending = schema.pending_totp
        async with self._transaction(write=False) as conn:
            token: str | None = (
                await conn.execute(
                    select(pending.c.secret_encrypted).where(
                        pending.c.user_key == user_key(user_id)
                    )
                )
            ).scalar_one_or_none()
        return None if token is None else self._decrypt(token)

    async def confirm_totp(self, user_id: str, secret: str, step: int, now: datetime) -> bool:
        key = user_key(user_id)
        pending, totp = schema.pending_totp, schema.totp
        async with self._transaction(write=True) as conn:
            token: str | None = (
                await conn.execute(
                    select(pending.c.secret_encrypted).where(pending.c.user_key == key)
                )
            ).scalar_one_or_none()
            if token is None or not hmac.compare_digest(
                self._decrypt(token).encode(), secret.encode()
            ):
                return False
            # Conditional on the exact token read: a concurrent confirm or a new pending
            # secret makes this delete miss, and then this confirm does not count.
            taken = await conn.execute(
                delete(pending).where(
                    pending.c.user_key == key, pending.c.secret_encrypted == token
                )
            )
            if taken.rowcount != 1:
                return False
            stmt = self._insert(totp).values(
                user_key=key,
                secret_encrypted=token,
                last_step=step,
                created_at=now,
                last_used_at=now,
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[totp.c.user_key],
                    set_={
                        "secret_encrypted": stmt.excluded.secret_encrypted,
                        "last_step": stmt.excluded.last_step,
                        "created_at": stmt.excluded.created_at,
                        "last_used_at": stmt.excluded.last_used_at,
                    },
                )
            )
        return True

    async def totp(self, user_id: str) -> TotpRecord | None:
        totp = schema.totp
        async with self._transaction(write=False) as conn:
            row = (
                (await conn.execute(select(totp).where(totp.c.user_key == user_key(user_id))))
                .mappings()
                .one_or_none()
            )
        if row is None:
            return None
        return TotpRecord(
            secret=self._decrypt(row["secret_encrypted"]),
            last_step=row["last_step"],
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
        )

    async def accept_totp_step(self, user_id: str, step: int, now: datetime) -> bool:
        totp = schema.totp
        stmt = (
            update(totp)
            .where(
                totp.c.user_key == user_key(user_id),
                or_(totp.c.last_step.is_(None), totp.c.last_step < step),
            )
            .values(last_step=step, last_used_at=now)
        )
        async with self._transaction(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def delete_totp(self, user_id: str) -> bool:
        key = user_key(user_id)
        async with self._transaction(write=True) as conn:
            await conn.execute(
                delete(schema.pending_totp).where(schema.pending_totp.c.user_key == key)
            )
            deleted = await conn.execute(delete(schema.totp).where(schema.totp.c.user_key == key))
            return deleted.rowcount > 0

    # recovery codes ---------------------------------------------------------------------

    async def replace_recovery_codes(
        self, user_id: str, code_hashes: list[bytes], now: datetime
    ) -> None:
        key = user_key(user_id)
        codes = schema.recovery_codes
        unique = list(dict.fromkeys(code_hashes))
        async with self._transaction(write=True) as conn:
            # Two concurrent regenerations must not leave both new sets valid.
            await self._pg_lock(conn, _LOCK_RECOVERY_CODES, key)
            await conn.execute(delete(codes).where(codes.c.user_key == key))
            if unique:
                await conn.execute(
                    codes.insert(),
                    [
                        {"user_key": key, "code_hash": h, "created_at": now, "used_at": None}
                        for h in unique
                    ],
                )

    async def use_recovery_code(self, user_id: str, code_hash: bytes, now: datetime) -> bool:
        codes = schema.recovery_codes
        stmt = (
            update(codes)
            .where(
                codes.c.user_key == user_key(user_id),
                codes.c.code_hash == code_hash,
                codes.c.used_at.is_(None),
            )
            .values(used_at=now)
        )
        async with self._transaction(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def recovery_codes_left(self, user_id: str) -> int:
        codes = schema.recovery_codes
        query = (
            select(func.count())
            .select_from(codes)
            .where(codes.c.user_key == user_key(user_id), codes.c.used_at.is_(None))
        )
        async with self._transaction(write=False) as conn:
            return int((await conn.execute(query)).scalar_one())

    # passkeys ---------------------------------------------------------------------------

    async def user_handle(self, user_id: str) -> bytes:
        key = user_key(user_id)
        mfa = schema.user_mfa
        query = select(mfa.c.webauthn_handle).where(mfa.c.user_key == key)
        async with self._transaction(write=False) as conn:
            handle: bytes | None = (await conn.execute(query)).scalar_one_or_none()
        if handle is not None:
            return bytes(handle)
        # Set-if-absent in one statement: concurrent first calls all return the one handle
        # that was written first (the row lock orders them).
        stmt = self._insert(mfa).values(
            user_key=key, mfa_generation=0, webauthn_handle=secrets.token_bytes(_HANDLE_BYTES)
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[mfa.c.user_key],
            set_={
                "webauthn_handle": func.coalesce(
                    mfa.c.webauthn_handle, stmt.excluded.webauthn_handle
                )
            },
        ).returning(mfa.c.webauthn_handle)
        async with self._transaction(write=True) as conn:
            created: bytes = (await conn.execute(upsert)).scalar_one()
        return bytes(created)

    async def user_for_handle(self, handle: bytes) -> str | None:
        mfa = schema.user_mfa
        async with self._transaction(write=False) as conn:
            found: str | None = (
                await conn.execute(select(mfa.c.user_key).where(mfa.c.webauthn_handle == handle))
            ).scalar_one_or_none()
        return found

    async def add_passkey(self, record: PasskeyRecord) -> None:
        passkeys = schema.passkeys
        stmt = (
            self._insert(passkeys)
            .values(
                credential_id=record.credential_id,
                user_key=user_key(record.user_id),
                public_key=record.public_key,
                sign_count=record.sign_count,
                transports=_json_list(record.transports),
                aaguid=record.aaguid,
                backup_eligible=record.backup_eligible,
                backup_state=record.backup_state,
                name=record.name,
                created_at=record.created_at,
                last_used_at=record.last_used_at,
            )
            .on_conflict_do_nothing(index_elements=[passkeys.c.credential_id])
        )
        async with self._transaction(write=True) as conn:
            inserted = (await conn.execute(stmt)).rowcount
        if inserted != 1:
            # Never overwrite: credential ids are public, and replacing the public key of
            # someone else's credential would hand their sign-in to the registrant.
            raise ValueError("this passkey is already registered")

    async def passkeys(self, user_id: str) -> list[PasskeyRecord]:
        passkeys = schema.passkeys
        query = (
            select(passkeys)
            .where(passkeys.c.user_key == user_key(user_id))
            .order_by(passkeys.c.created_at, passkeys.c.credential_id)
        )
        async with self._transaction(write=False) as conn:
            return [_passkey(row) for row in (await conn.execute(query)).mappings()]

    async def passkey(self, credential_id: bytes) -> PasskeyRecord | None:
        passkeys = schema.passkeys
        query = select(passkeys).where(passkeys.c.credential_id == credential_id)
        async with self._transaction(write=False) as conn:
            row = (await conn.execute(query)).mappings().one_or_none()
        return None if row is None else _passkey(row)

    async def update_passkey_use(
        self,
        credential_id: bytes,
        *,
        old_sign_count: int,
        new_sign_count: int,
        backup_state: bool,
        now: datetime,
    ) -> bool:
        passkeys = schema.passkeys
        stmt = (
            update(passkeys)
            .where(
                passkeys.c.credential_id == credential_id,
                passkeys.c.sign_count == old_sign_count,
            )
            .values(sign_count=new_sign_count, backup_state=backup_state, last_used_at=now)
        )
        async with self._transaction(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def delete_passkey(self, user_id: str, credential_id: bytes) -> bool:
        passkeys = schema.passkeys
        stmt = delete(passkeys).where(
            passkeys.c.user_key == user_key(user_id), passkeys.c.credential_id == credential_id
        )
        async with self._transaction(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def rename_passkey(self, user_id: str, credential_id: bytes, name: str) -> bool:
        passkeys = schema.passkeys
        stmt = (
            update(passkeys)
            .where(
                passkeys.c.user_key == user_key(user_id),
                passkeys.c.credential_id == credential_id,
            )
            .values(name=name)
        )
        async with self._transaction(write=True) as conn:
            return (await conn.execute(stmt)).rowcount == 1

    # WebAuthn challenges ----------------------------------------------------------------

    async def put_challenge(
        self,
        challenge_id: str,
        *,
        user_id: str,
        session_id: str,
        purpose: str,
        challenge: bytes,
        expires_at: datetime,
    ) -> None:
        async with self._transaction(write=True) as conn:
            await conn.execute(
                schema.challenges.insert().values(
                    id=challenge_id,
                    user_key=user_key(user_id),
                    session_id=session_id,
                    purpose=purpose,
                    challenge=challenge,
                    expires_at=expires_at,
                )
            )

    async def take_challenge(
        self, challenge_id: str, *, user_id: str, session_id: str, purpose: str, now: datetime
    ) -> bytes | None:
        ch = schema.challenges
        # Housekeeping first, in its own transaction, so that a failure here cannot lose a
        # challenge already taken below.
        async with self._transaction(write=True) as conn:
            await conn.execute(delete(ch).where(ch.c.expires_at <= now))
        stmt = (
            delete(ch)
            .where(
                ch.c.id == challenge_id,
                ch.c.user_key == user_key(user_id),
                ch.c.session_id == session_id,
                ch.c.purpose == purpose,
                ch.c.expires_at > now,
            )
            .returning(ch.c.challenge)
        )
        async with self._transaction(write=True) as conn:
            taken: bytes | None = (await conn.execute(stmt)).scalar_one_or_none()
        return None if taken is None else bytes(taken)

    # lockout ----------------------------------------------------------------------------

    async def lockout_status(self, keys: list[str], now: datetime) -> LockoutStatus:
        if not keys:
            return LockoutStatus(locked_until=None, failures=0)
        lockout = schema.lockout
        async with self._transaction(write=False) as conn:
            rows = (
                await conn.execute(select(lockout).where(lockout.c.key.in_(sorted(set(keys)))))
            ).all()
        return _strictest(rows, now)

    async def record_failure(
        self,
        keys: list[str],
        *,
        now: datetime,
        window_seconds: float,
        max_failures: int,
        ban_seconds: float,
    ) -> LockoutStatus:
        if not keys:
            return LockoutStatus(locked_until=None, failures=0)
        lockout = schema.lockout
        window_end = now + timedelta(seconds=window_seconds)
        ban_until = now + timedelta(seconds=ban_seconds)
        first_ban = ban_until if max_failures <= 1 else None

        def at(value: datetime | None) -> ColumnElement[Any]:
            return literal(value, schema.UtcDateTime())

        # The whole rule is in the statement, evaluated against the row as it is when the
        # statement runs, so concurrent failures on any replica are all counted.
        banned = and_(lockout.c.locked_until.is_not(None), lockout.c.locked_until > now)
        # A new window starts when the old one ran out or a served ban ended it (a ban
        # outlasting its window is not lifted by the window's end).
        fresh = and_(
            not_(banned),
            or_(lockout.c.window_end <= now, lockout.c.locked_until.is_not(None)),
        )
        set_: dict[str, ColumnElement[Any]] = {
            "window_start": case((fresh, at(now)), else_=lockout.c.window_start),
            "window_end": case((fresh, at(window_end)), else_=lockout.c.window_end),
            "failures": case((fresh, literal(1)), else_=lockout.c.failures + 1),
            "locked_until": case(
                (fresh, at(first_ban)),
                (banned, lockout.c.locked_until),  # already banned: the ban is not extended
                (lockout.c.failures + 1 >= max_failures, at(ban_until)),
                else_=null(),
            ),
        }
        rows: list[Row[Any]] = []
        async with self._transaction(write=True) as conn:
            # One upsert per key, in a fixed order so that concurrent callers on PostgreSQL
            # take the row locks in the same order (no deadlock).
            for key in sorted(set(keys)):
                stmt = (
                    self._insert(lockout)
                    .values(
                        key=key,
                        window_start=now,
                        window_end=window_end,
                        failures=1,
                        locked_until=first_ban,
                    )
                    .on_conflict_do_update(index_elements=[lockout.c.key], set_=set_)
                    .returning(*lockout.c)
                )
                rows.append((await conn.execute(stmt)).one())
        # Rows whose window and ban are both over count for nothing (an upsert starts
        # afresh on them): prune them, in a transaction of their own (no lock interleaving
        # with the upserts), so the table does not grow with every address that ever
        # failed once.
        async with self._transaction(write=True) as conn:
            await conn.execute(
                delete(lockout).where(
                    lockout.c.window_end <= now,
                    or_(lockout.c.locked_until.is_(None), lockout.c.locked_until <= now),
                )
            )
        return _strictest(rows, now)

    async def clear_failures(self, keys: list[str]) -> None:
        if not keys:
            return
        lockout = schema.lockout
        async with self._transaction(write=True) as conn:
            await conn.execute(delete(lockout).where(lockout.c.key.in_(sorted(set(keys)))))

    # security settings ------------------------------------------------------------------

    async def settings(self) -> SecuritySettings | None:
        table = schema.security_settings
        async with self._transaction(write=False) as conn:
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
            ip_allowlist=_tuple_of_str(row["ip_allowlist"]),
            ip_denylist=_tuple_of_str(row["ip_denylist"]),
            policy_epoch=row["policy_epoch"],
            version=row["version"],
            updated_by=row["updated_by"],
            updated_at=row["updated_at"],
        )

    async def settings_version(self) -> int:
        table = schema.security_settings
        async with self._transaction(write=False) as conn:
            version: int | None = (
                await conn.execute(select(table.c.version).where(table.c.id == _SETTINGS_ID))
            ).scalar_one_or_none()
        return version or 0

    async def save_settings(
        self, new: SecuritySettings, *, expected_version: int
    ) -> SecuritySettings | None:
        table = schema.security_settings
        version = expected_version + 1
        values = {
            "mfa_policy": new.mfa_policy,
            "grace_period_seconds": new.grace_period_seconds,
            "ip_allowlist": _json_list(new.ip_allowlist),
            "ip_denylist": _json_list(new.ip_denylist),
            "policy_epoch": new.policy_epoch,
            "version": version,
            "updated_by": new.updated_by,
            "updated_at": new.updated_at,
        }
        if expected_version == 0:
            stmt: Any = (
                self._insert(table)
                .values(id=_SETTINGS_ID, **values)
                .on_conflict_do_nothing(index_elements=[table.c.id])
            )
        else:
            stmt = (
                update(table)
                .where(table.c.id == _SETTINGS_ID, table.c.version == expected_version)
                .values(**values)
            )
        async with self._transaction(write=True) as conn:
            written = (await conn.execute(stmt)).rowcount
        if written != 1:
            return None
        return dataclasses.replace(new, version=version)

    # audit ------------------------------------------------------------------------------

    async def append_audit(
        self,
        *,
        time: datetime,
        actor: str | None,
        client_ip: str | None,
        action: str,
        target: str | None,
        outcome: str,
        details: str,
    ) -> AuditEntry:
        audit = schema.audit
        time = datetime.fromisoformat(chain.canonical_time(time))  # aware UTC, or ValueError
        async with self._transaction(write=True) as conn:
            # Read-then-insert must not interleave with another writer: on PostgreSQL the
            # advisory lock serializes appenders; on SQLite this transaction began IMMEDIATE.
            await self._pg_lock(conn, _LOCK_AUDIT)
            last = (
                await conn.execute(
                    select(audit.c.seq, audit.c.hash).order_by(audit.c.seq.desc()).limit(1)
                )
            ).one_or_none()
            seq, prev_hash = (last.seq + 1, last.hash) if last is not None else (1, chain.GENESIS)
            entry = AuditEntry(
                seq=seq,
                time=time,
                actor=actor,
                client_ip=client_ip,
                action=action,
                target=target,
                outcome=outcome,
                details=details,
                prev_hash=prev_hash,
                hash=chain.record_hash(
                    prev_hash, seq, time, actor, client_ip, action, target, outcome, details
                ),
            )
            await conn.execute(audit.insert().values(**dataclasses.asdict(entry)))
        return entry

    async def audit_entries(
        self,
        *,
        limit: int,
        action: str | None = None,
        actor: str | None = None,
        before_seq: int | None = None,
    ) -> list[AuditEntry]:
        audit = schema.audit
        query = select(audit).order_by(audit.c.seq.desc()).limit(max(limit, 0))
        if action is not None:
            query = query.where(audit.c.action == action)
        if actor is not None:
            query = query.where(audit.c.actor == actor)
        if before_seq is not None:
            query = query.where(audit.c.seq < before_seq)
        async with self._transaction(write=False) as conn:
            return [_audit(row) for row in (await conn.execute(query)).mappings()]

    async def all_audit_entries(self) -> list[AuditEntry]:
        audit = schema.audit
        async with self._transaction(write=False) as conn:
            rows = await conn.execute(select(audit).order_by(audit.c.seq))
            return [_audit(row) for row in rows.mappings()]


# row mapping ------------------------------------------------------------------------------


def _users_query() -> Select[Any]:
    users, mfa = schema.users, schema.user_mfa
    return select(
        *users.c, func.coalesce(mfa.c.mfa_generation, 0).label("mfa_generation")
    ).select_from(users.outerjoin(mfa, mfa.c.user_key == users.c.user_key))


def _user(row: RowMapping) -> UserRecord:
    return UserRecord(
        user_id=row["user_key"],
        display_id=row["display_id"],
        email=row["email"],
        role=row["role"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        mfa_generation=row["mfa_generation"],
    )


def _passkey(row: RowMapping) -> PasskeyRecord:
    return PasskeyRecord(
        credential_id=bytes(row["credential_id"]),
        user_id=row["user_key"],
        public_key=bytes(row["public_key"]),
        sign_count=row["sign_count"],
        transports=_tuple_of_str(row["transports"]),
        aaguid=row["aaguid"],
        backup_eligible=bool(row["backup_eligible"]),
        backup_state=bool(row["backup_state"]),
        name=row["name"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )


def _audit(row: RowMapping) -> AuditEntry:
    return AuditEntry(
        seq=row["seq"],
        time=row["time"],
        actor=row["actor"],
        client_ip=row["client_ip"],
        action=row["action"],
        target=row["target"],
        outcome=row["outcome"],
        details=row["details"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def _strictest(rows: Sequence[Row[Any]], now: datetime) -> LockoutStatus:
    """The latest ban still running and the most failures inside a current window."""
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


def _enable_wal(cursor: Any) -> None:
    """Switch a new database to WAL. The switch takes an exclusive lock without waiting on
    the busy timeout, so processes opening a fresh file at once retry it briefly; WAL is
    persistent, so a database already in WAL mode is left alone."""
    cursor.execute("PRAGMA journal_mode")
    row = cursor.fetchone()
    if row is not None and str(row[0]).lower() == "wal":
        return
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT
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
            cursor.execute(f"PRAGMA busy_timeout = {int(_SQLITE_BUSY_TIMEOUT * 1000)}")
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
