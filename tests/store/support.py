"""Stores for tests, of either kind: a SQLite file under ``tmp_path`` or a fresh schema in the
PostgreSQL database named by ``SIDECAR_TEST_POSTGRES_URL`` (dropped afterwards).

Other test modules use ``open_test_store``::

    from tests.store.support import open_test_store

    async with open_test_store("sqlite", tmp_path) as store:
        ...
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from sidecar.store import PasskeyRecord, schema
from sidecar.store.sql import SqlStore, async_url

StoreKind = Literal["sqlite", "postgresql"]
POSTGRES_URL_ENV = "SIDECAR_TEST_POSTGRES_URL"


def postgres_url() -> str:
    """The test server's URL, or a skip with the reason when there is none."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set: PostgreSQL store tests need a server")
    return url


@dataclass(frozen=True)
class StoreTarget:
    """Where a test's database lives; ``open()`` gives another store on it (a "replica")."""

    kind: StoreKind
    url: str
    encryption_key: str
    schema: str | None = None

    def open(self, *, encryption_key: str | None = None) -> SqlStore:
        return SqlStore(self.url, encryption_key or self.encryption_key, schema=self.schema)


async def _execute(url: str, *statements: str) -> None:
    admin = create_async_engine(async_url(url), poolclass=NullPool)
    try:
        async with admin.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await admin.dispose()


async def create_schema(url: str) -> str:
    """A new, empty schema with a random name."""
    name = f"t_{secrets.token_hex(6)}"
    await _execute(url, f'CREATE SCHEMA "{name}"')
    return name


async def drop_schema(url: str, name: str) -> None:
    await _execute(url, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def empty_tables(url: str, name: str) -> None:
    """Delete every row but the schema version: much faster than a new schema per test."""
    await _execute(
        url,
        *(
            f'DELETE FROM "{name}"."{table.name}"'  # noqa: S608 (our own names)
            for table in schema.metadata.sorted_tables
            if table is not schema.schema_version
        ),
    )


@asynccontextmanager
async def _postgres_schema(url: str) -> AsyncIterator[str]:
    name = await create_schema(url)
    try:
        yield name
    finally:
        await drop_schema(url, name)


@asynccontextmanager
async def fresh_database(kind: StoreKind, tmp_path: Path) -> AsyncIterator[StoreTarget]:
    """An empty database of ``kind`` (not migrated), removed afterwards."""
    key = Fernet.generate_key().decode()
    if kind == "sqlite":
        yield StoreTarget(kind, f"sqlite:///{tmp_path / 'store.db'}", key)
        return
    url = postgres_url()
    async with _postgres_schema(url) as schema:
        yield StoreTarget(kind, url, key, schema)


@asynccontextmanager
async def open_test_store(kind: StoreKind, tmp_path: Path) -> AsyncIterator[SqlStore]:
    """A migrated store of ``kind`` for one test, closed (and its schema dropped) after."""
    async with fresh_database(kind, tmp_path) as target:
        store = target.open()
        try:
            await store.migrate()
            yield store
        finally:
            await store.close()


async def add_passkey(store: SqlStore, record: PasskeyRecord) -> int:
    """Add a passkey as an enrolled, verified session would (conditional on the current
    generation, or as a first enrollment); the generation it was added under."""
    state = await store.mfa.state(record.user_id)
    generation = await store.mfa.add_passkey(
        record, expected_generation=state.mfa_generation if state.enrolled else None
    )
    assert generation is not None
    return generation
