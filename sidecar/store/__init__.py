"""Persistence behind one interface (``Store``), on SQLite or PostgreSQL.

``open_store(config.storage.url, config.storage.encryption_key)`` gives the store; call
``await store.migrate()`` at start and ``await store.close()`` at shutdown. Its tables are
reached by aggregate: ``store.users``, ``store.mfa``, ``store.lockout``, ``store.settings``,
``store.audit``.
"""

from __future__ import annotations

from sidecar.store.base import (
    AuditEntry,
    LockoutStatus,
    MfaState,
    PasskeyRecord,
    PendingTotp,
    Reservation,
    SecuritySettings,
    Store,
    StoreUnavailable,
    TotpRecord,
    UserRecord,
)
from sidecar.store.sql import SqlStore

__all__ = [
    "AuditEntry",
    "LockoutStatus",
    "MfaState",
    "PasskeyRecord",
    "PendingTotp",
    "Reservation",
    "SecuritySettings",
    "SqlStore",
    "Store",
    "StoreUnavailable",
    "TotpRecord",
    "UserRecord",
    "open_store",
]


def open_store(url: str, encryption_key: str, *, schema: str | None = None) -> Store:
    """The store for ``storage.url`` (``sqlite:///path``, ``sqlite+aiosqlite:///path``,
    ``postgresql://...``, ``postgres://...`` or ``postgresql+asyncpg://...``).

    Does not connect yet. Raises ValueError for an unsupported URL or an invalid Fernet
    ``encryption_key``. ``schema`` (PostgreSQL only) selects the schema holding the tables.
    """
    return SqlStore(url, encryption_key, schema=schema)
