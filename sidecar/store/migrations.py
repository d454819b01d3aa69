"""Versioned schema migrations, applied in order by ``SqlStore.migrate``.

Each step is the DDL of record for one schema version and never changes once released: a
schema change is a new step appended to ``MIGRATIONS`` plus the matching edit to
``schema.py`` (whose tables the queries use; a test checks that a migrated database matches
them). Steps run inside the migration transaction, which holds a lock across processes
(``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), and each applied
step is recorded in ``schema_version`` in that same transaction: PostgreSQL and SQLite both
have transactional DDL, so a failed step leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from sidecar.store.schema import UtcDateTime


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]  # runs synchronously via AsyncConnection.run_sync


def _v1_initial(conn: Connection) -> None:
    md = MetaData()
    Table(
        "users",
        md,
        Column("user_key", String, primary_key=True),
        Column("display_id", String, nullable=False),
        Column("email", String),
        Column("role", String),
        Column("first_seen", UtcDateTime, nullable=False),
        Column("last_seen", UtcDateTime, nullable=False),
    )

    Table(
        "user_mfa",
        md,
        Column("user_key", String, primary_key=True),
        Column("mfa_generation", Integer, nullable=False),
        Column("webauthn_handle", LargeBinary, unique=True),
    )

    Table(
        "grace",
        md,
        Column("user_key", String, primary_key=True),
        Column("epoch", Integer, primary_key=True, autoincrement=False),
        Column("started_at", UtcDateTime, nullable=False),
    )

    Table(
        "totp",
        md,
        Column("user_key", String, primary_key=True),
        Column("secret_encrypted", Text, nullable=False),  # Fernet token
        Column("last_step", BigInteger),
        Column("created_at", UtcDateTime, nullable=False),
        Column("last_used_at", UtcDateTime),
    )

    Table(
        "pending_totp",
        md,
        Column("user_key", String, primary_key=True),
        Column("secret_encrypted", Text, nullable=False),  # Fernet token
        Column("created_at", UtcDateTime, nullable=False),
    )

    Table(
        "recovery_codes",
        md,
        Column("user_key", String, primary_key=True),
        Column("code_hash", LargeBinary, primary_key=True),
        Column("created_at", UtcDateTime, nullable=False),
        Column("used_at", UtcDateTime),
    )

    Table(
        "passkeys",
        md,
        Column("credential_id", LargeBinary, primary_key=True),
        Column("user_key", String, nullable=False),
        Column("public_key", LargeBinary, nullable=False),
        Column("sign_count", BigInteger, nullable=False),
        Column("transports", Text, nullable=False),  # JSON list of strings
        Column("aaguid", String, nullable=False),
        Column("backup_eligible", Boolean, nullable=False),
        Column("backup_state", Boolean, nullable=False),
        Column("name", String, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        Column("last_used_at", UtcDateTime),
        Index("ix_passkeys_user_key", "user_key"),
    )

    Table(
        "challenges",
        md,
        Column("id", String, primary_key=True),
        Column("user_key", String, nullable=False),
        Column("session_id", String, nullable=False),
        Column("purpose", String, nullable=False),
        Column("challenge", LargeBinary, nullable=False),
        Column("expires_at", UtcDateTime, nullable=False),
        Index("ix_challenges_expires_at", "expires_at"),
    )

    Table(
        "lockout",
        md,
        Column("key", String, primary_key=True),
        Column("window_start", UtcDateTime, nullable=False),
        Column("window_end", UtcDateTime, nullable=False),
        Column("failures", Integer, nullable=False),
        Column("locked_until", UtcDateTime),
    )

    Table(
        "security_settings",
        md,
        Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
        Column("mfa_policy", String, nullable=False),
        Column("grace_period_seconds", Float, nullable=False),
        Column("ip_allowlist", Text, nullable=False),  # JSON list of strings
        Column("ip_denylist", Text, nullable=False),  # JSON list of strings
        Column("policy_epoch", Integer, nullable=False),
        Column("version", Integer, nullable=False),
        Column("updated_by", String),
        Column("updated_at", UtcDateTime, nullable=False),
    )

    Table(
        "audit",
        md,
        Column("seq", BigInteger, primary_key=True, autoincrement=False),
        Column("time", UtcDateTime, nullable=False),
        Column("actor", String),
        Column("client_ip", String),
        Column("action", String, nullable=False),
        Column("target", String),
        Column("outcome", String, nullable=False),
        Column("details", Text, nullable=False),  # JSON text
        Column("prev_hash", String(64), nullable=False),
        Column("hash", String(64), nullable=False),
        Index("ix_audit_action_seq", "action", "seq"),
        Index("ix_audit_actor_seq", "actor", "seq"),
    )

    md.create_all(conn, checkfirst=False)


MIGRATIONS: tuple[Migration, ...] = (Migration(1, "initial schema", _v1_initial),)

#: The schema version this code expects.
LATEST_VERSION = MIGRATIONS[-1].version
