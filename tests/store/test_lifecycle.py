"""Opening, migrating, failing and recovering."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Connection, inspect, select, text

from sidecar.store import (
    LockoutStatus,
    PasskeyRecord,
    Reservation,
    SecuritySettings,
    SqlStore,
    Store,
    StoreUnavailable,
    open_store,
)
from sidecar.store import schema as tables
from sidecar.store.base import (
    AuditStore,
    LockoutStore,
    MfaStore,
    ReservedKey,
    SettingsStore,
    UserStore,
)
from sidecar.store.migrations import LATEST_VERSION
from sidecar.store.sql import async_url
from tests.store.support import StoreTarget, postgres_url

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
KEY = Fernet.generate_key().decode()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////var/lib/sidecar/state.db", "sqlite+aiosqlite:////var/lib/sidecar/state.db"),
        ("sqlite:///state.db", "sqlite+aiosqlite:///state.db"),
        ("sqlite+aiosqlite:///state.db", "sqlite+aiosqlite:///state.db"),
        ("postgresql://u:p@db:5432/sidecar", "postgresql+asyncpg://u:p@db:5432/sidecar"),
        ("postgres://u@db/sidecar", "postgresql+asyncpg://u@db/sidecar"),
        ("postgresql+asyncpg://u@db/sidecar", "postgresql+asyncpg://u@db/sidecar"),
    ],
)
def test_urls_map_to_async_drivers(url: str, expected: str) -> None:
    assert async_url(url).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u@db/sidecar",
        "postgresql+psycopg2://u@db/sidecar",
        "sqlite+pysqlite:///x.db",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?cache=shared&uri=true",
        "sqlite:///file:x?mode=memory&uri=true",
    ],
)
def test_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"storage\.url"):
        open_store(url, KEY)


def test_bad_keys_and_misplaced_schemas_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Fernet key"):
        open_store(f"sqlite:///{tmp_path / 's.db'}", "not-a-key")
    with pytest.raises(ValueError, match="PostgreSQL"):
        open_store(f"sqlite:///{tmp_path / 's.db'}", KEY, schema="x")


async def test_migrate_creates_the_schema_once(empty_target: StoreTarget) -> None:
    store = empty_target.open()
    try:
        assert await store.schema_version() == 0
        await store.migrate()
        assert await store.schema_version() == LATEST_VERSION
        await store.users.touch("alice", email=None, role=None, now=T0)

        await store.migrate()  # a no-op, keeping the data
        async with store.engine.connect() as conn:
            versions = (await conn.execute(select(tables.schema_version.c.version))).all()
        assert [v for (v,) in versions] == list(range(1, LATEST_VERSION + 1))
        assert [u.user_id for u in await store.users.all()] == ["alice"]
    finally:
        await store.close()


async def test_concurrent_migrations_apply_each_step_once(empty_target: StoreTarget) -> None:
    stores = [empty_target.open() for _ in range(3)]
    try:
        await asyncio.gather(*(s.migrate() for s in stores))
        async with stores[0].engine.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM schema_version"))).scalar()
        assert count == LATEST_VERSION
    finally:
        for s in stores:
            await s.close()


async def test_migrations_build_the_tables_the_queries_use(store: SqlStore) -> None:
    def describe(conn: Connection) -> dict[str, Any]:
        inspector = inspect(conn)
        return {
            name: (
                {(c["name"], bool(c["nullable"])) for c in inspector.get_columns(name)},
                set(inspector.get_pk_constraint(name)["constrained_columns"]),
            )
            for name in inspector.get_table_names()
        }

    async with store.engine.connect() as conn:
        migrated = await conn.run_sync(describe)
    expected = {
        table.name: (
            {(c.name, bool(c.nullable)) for c in table.columns},
            {c.name for c in table.primary_key.columns},
        )
        for table in tables.metadata.sorted_tables
    }
    assert migrated == expected


async def test_a_newer_schema_is_refused(private_store: SqlStore) -> None:
    store = private_store
    async with store.engine.begin() as conn:
        await conn.execute(
            tables.schema_version.insert().values(
                version=LATEST_VERSION + 1, description="from the future", applied_at=T0
            )
        )
    with pytest.raises(StoreUnavailable, match="newer than this sidecar"):
        await store.migrate()


async def test_sqlite_connections_are_configured(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 's.db'}", KEY)
    try:
        await store.migrate()
        async with store.engine.connect() as conn:
            pragmas = [
                (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            ]
        assert pragmas == ["wal", 1, 5000]
    finally:
        await store.close()


async def test_naive_datetimes_are_a_caller_error(store: SqlStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.users.touch("alice", email=None, role=None, now=datetime(2030, 1, 1))


# Unavailability ----------------------------------------------------------------------------

PASSKEY = PasskeyRecord(
    credential_id=b"c",
    user_id="alice",
    public_key=b"k",
    sign_count=0,
    transports=(),
    aaguid="",
    backup_eligible=False,
    backup_state=False,
    name="n",
    created_at=T0,
    last_used_at=None,
)
SETTINGS = SecuritySettings("all", 1.0, (), (), 0, None, T0)
AUDIT = {
    "time": T0,
    "actor": None,
    "client_ip": None,
    "action": "a",
    "target": None,
    "outcome": "success",
    "details": "{}",
}
CALLS: dict[str, Callable[[Store], Awaitable[object]]] = {
    "migrate": lambda s: s.migrate(),
    "ping": lambda s: s.ping(),
    "users.touch": lambda s: s.users.touch("a", email=None, role=None, now=T0),
    "users.all": lambda s: s.users.all(),
    "users.grace_started": lambda s: s.users.grace_started("a", T0),
    "users.grace_starts": lambda s: s.users.grace_starts(),
    "users.rekeyed": lambda s: s.users.rekeyed(),
    "mfa.state": lambda s: s.mfa.state("a"),
    "mfa.enrolled_users": lambda s: s.mfa.enrolled_users(),
    "mfa.reset": lambda s: s.mfa.reset("a"),
    "mfa.record_binding": lambda s: s.mfa.record_binding("a", "b", T0),
    "mfa.binding_revoked": lambda s: s.mfa.binding_revoked("a", "b"),
    "mfa.begin_totp": lambda s: s.mfa.begin_totp("a", "S", session_id="s", now=T0),
    "mfa.pending_totp": lambda s: s.mfa.pending_totp("a"),
    "mfa.confirm_totp": lambda s: s.mfa.confirm_totp(
        "a", secret="S", step=1, session_id="s", issued_after=T0, expected_generation=None, now=T0
    ),
    "mfa.totp": lambda s: s.mfa.totp("a"),
    "mfa.accept_totp_step": lambda s: s.mfa.accept_totp_step("a", 1, T0),
    "mfa.remove_totp": lambda s: s.mfa.remove_totp("a", expected_generation=0),
    "mfa.add_passkey": lambda s: s.mfa.add_passkey(PASSKEY, expected_generation=None),
    "mfa.passkeys": lambda s: s.mfa.passkeys("a"),
    "mfa.passkey": lambda s: s.mfa.passkey(b"c"),
    "mfa.record_passkey_use": lambda s: s.mfa.record_passkey_use(
        b"c", old_sign_count=0, new_sign_count=1, backup_state=False, now=T0
    ),
    "mfa.remove_passkey": lambda s: s.mfa.remove_passkey("a", b"c", expected_generation=0),
    "mfa.rename_passkey": lambda s: s.mfa.rename_passkey("a", b"c", "n"),
    "mfa.replace_recovery_codes": lambda s: s.mfa.replace_recovery_codes(
        "a", [b"h"], expected_generation=0, now=T0
    ),
    "mfa.use_recovery_code": lambda s: s.mfa.use_recovery_code("a", b"h", T0),
    "mfa.recovery_codes_left": lambda s: s.mfa.recovery_codes_left("a"),
    "mfa.user_handle": lambda s: s.mfa.user_handle("a"),
    "mfa.user_for_handle": lambda s: s.mfa.user_for_handle(b"h"),
    "mfa.put_challenge": lambda s: s.mfa.put_challenge(
        "c", user_id="a", session_id="s", purpose="p", challenge=b"x", expires_at=T0
    ),
    "mfa.take_challenge": lambda s: s.mfa.take_challenge(
        "c", user_id="a", session_id="s", purpose="p", now=T0
    ),
    "lockout.status": lambda s: s.lockout.status(["k"], T0),
    "lockout.reserve": lambda s: s.lockout.reserve(
        {"k": 5}, now=T0, window_seconds=60.0, ban_seconds=60.0
    ),
    "lockout.release": lambda s: s.lockout.release(
        Reservation(True, LockoutStatus(None, 1), (ReservedKey("k", T0, 1, 5, False),))
    ),
    "settings.current": lambda s: s.settings.current(),
    "settings.version": lambda s: s.settings.version(),
    "settings.save": lambda s: s.settings.save(SETTINGS, expected_version=0),
    "audit.append": lambda s: s.audit.append(**AUDIT),  # type: ignore[arg-type]
    "audit.entries": lambda s: s.audit.entries(limit=10),
    "audit.all": lambda s: s.audit.all(),
}

AGGREGATES = {
    "users": UserStore,
    "mfa": MfaStore,
    "lockout": LockoutStore,
    "settings": SettingsStore,
    "audit": AuditStore,
}


def _public(protocol: type) -> set[str]:
    return {name for name in dir(protocol) if not name.startswith("_")}


def test_every_store_method_is_covered() -> None:
    methods = {f"{name}.{m}" for name, protocol in AGGREGATES.items() for m in _public(protocol)}
    methods |= _public(Store) - set(AGGREGATES) - {"close"}
    assert methods == set(CALLS)


@pytest.mark.parametrize("method", sorted(CALLS))
async def test_a_refused_connection_is_store_unavailable(method: str) -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/x", KEY)
    try:
        with pytest.raises(StoreUnavailable, match="database unavailable"):
            await CALLS[method](store)
    finally:
        await store.close()


async def test_a_missing_sqlite_directory_is_created(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'var' / 'lib' / 'state.db'}", KEY)
    try:
        await store.migrate()
        assert (tmp_path / "var" / "lib" / "state.db").is_file()
    finally:
        await store.close()


async def test_an_unusable_sqlite_directory_is_store_unavailable_until_it_works(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "not-yet"
    directory.write_text("a file where the folder should be")
    store = open_store(f"sqlite:///{directory / 'state.db'}", KEY)
    try:
        with pytest.raises(StoreUnavailable, match="OperationalError"):
            await store.migrate()
        directory.unlink()
        directory.mkdir()
        # Recovers without a restart: once the breaker lets the next try through.
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            try:
                await store.migrate()
                break
            except StoreUnavailable:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
        assert await store.mfa.recovery_codes_left("a") == 0
    finally:
        await store.close()


async def test_a_silent_server_times_out_as_store_unavailable() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # never answers

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = SqlStore(f"postgresql://postgres@127.0.0.1:{port}/x", KEY, connect_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(StoreUnavailable, match="database unavailable"):
            await store.ping()
        assert loop.time() - started < 2
    finally:
        await store.close()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_errors_do_not_carry_secrets(private_store: SqlStore) -> None:
    store = private_store
    # A broken table makes the statement fail on the server with our parameters bound.
    async with store.engine.begin() as conn:
        await conn.execute(text("DROP TABLE recovery_codes"))
    code_hash = bytes.fromhex("5ec7e75ec7e75ec7e75ec7e75ec7e75e")
    with pytest.raises(StoreUnavailable) as raised:
        await store.mfa.use_recovery_code("alice", code_hash, T0)
    for text_form in (str(raised.value), str(raised.value.__cause__)):
        assert "5ec7e7" not in text_form
        assert "\\x5e" not in text_form


@pytest.mark.postgres
async def test_postgres_connections_killed_under_the_store_are_replaced(
    tmp_path: Path,
) -> None:
    url = postgres_url()
    store = open_store(url, KEY)
    admin = open_store(url, KEY)
    try:
        assert isinstance(store, SqlStore)
        assert isinstance(admin, SqlStore)
        await store.ping()  # one pooled connection
        async with store.engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with admin.engine.connect() as conn:
            killed = await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            assert killed.scalar_one() is True
        await store.ping()
        async with store.engine.connect() as conn:
            assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
    finally:
        await store.close()
        await admin.close()
