"""Store fixtures: every store test runs against SQLite and against PostgreSQL.

``store`` is a migrated, empty store; ``replica`` is a second, independent store (its own
connection pool) on the same database, standing in for another sidecar replica; ``target``
describes the database, for tests that open more stores or read tables directly;
``empty_target`` is a database nobody has migrated yet, and ``private_store`` a migrated store
on one, for tests that alter the schema.

SQLite tests get a new file each. PostgreSQL tests share one schema per test session, created
and migrated once and emptied before each test (a new schema per test costs ~100 ms of DDL).
Other test modules that need a store use ``open_test_store`` from ``tests.store.support``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from sidecar.store.sql import SqlStore
from tests.store.support import (
    StoreKind,
    StoreTarget,
    create_schema,
    drop_schema,
    empty_tables,
    fresh_database,
    open_test_store,
    postgres_url,
)

__all__ = ["open_test_store"]


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def store_kind(request: pytest.FixtureRequest) -> StoreKind:
    kind: StoreKind = request.param
    return kind


@pytest.fixture(scope="session")
def postgres_session_schema() -> Iterator[tuple[str, str]]:
    """(url, schema): one migrated schema for the session's PostgreSQL tests."""
    url = postgres_url()

    async def create() -> str:
        name = await create_schema(url)
        store = SqlStore(url, Fernet.generate_key().decode(), schema=name)
        try:
            await store.migrate()
        finally:
            await store.close()
        return name

    # Its own event loop: each test runs in a fresh one, and nothing here outlives this call.
    name = asyncio.run(create())
    try:
        yield url, name
    finally:
        asyncio.run(drop_schema(url, name))


@pytest.fixture
def postgres_schema(store_kind: StoreKind, request: pytest.FixtureRequest) -> tuple[str, str]:
    """The session schema, requested only by PostgreSQL tests (so that SQLite tests run, and
    PostgreSQL tests skip, without a server). A sync fixture: the session fixture runs its
    own event loop, which it cannot do from inside a running one."""
    if store_kind != "postgresql":
        return ("", "")
    session_schema: tuple[str, str] = request.getfixturevalue("postgres_session_schema")
    return session_schema


@pytest.fixture
async def target(
    store_kind: StoreKind, tmp_path: Path, postgres_schema: tuple[str, str]
) -> StoreTarget:
    key = Fernet.generate_key().decode()
    if store_kind == "sqlite":
        return StoreTarget("sqlite", f"sqlite:///{tmp_path / 'store.db'}", key)
    url, name = postgres_schema
    await empty_tables(url, name)
    return StoreTarget("postgresql", url, key, name)


@pytest.fixture
async def empty_target(store_kind: StoreKind, tmp_path: Path) -> AsyncIterator[StoreTarget]:
    async with fresh_database(store_kind, tmp_path) as database:
        yield database


@pytest.fixture
async def store(target: StoreTarget) -> AsyncIterator[SqlStore]:
    opened = target.open()
    try:
        await opened.migrate()  # a no-op on the shared PostgreSQL schema
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def private_store(empty_target: StoreTarget) -> AsyncIterator[SqlStore]:
    """A migrated store on a database of its own, for tests that alter the schema."""
    opened = empty_target.open()
    try:
        await opened.migrate()
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def replica(target: StoreTarget, store: SqlStore) -> AsyncIterator[SqlStore]:
    opened = target.open()
    try:
        yield opened
    finally:
        await opened.close()
