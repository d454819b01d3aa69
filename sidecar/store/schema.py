"""The tables as the queries see them: the shape after the latest migration.

The DDL of record lives in ``migrations.py`` (one step per schema version); these definitions
must match what the steps produce, which ``tests/store/test_migrations.py`` checks by
reflecting a migrated database. Column types are portable: the only dialect difference is
``UtcDateTime``, which is ``timestamptz`` on PostgreSQL and a fixed-width ISO-8601 UTC string
on SQLite (so ``<``/``>`` compare correctly as text and values read back as aware UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

# Fixed width (years 1000-9999), so SQLite's text ordering is time ordering.
_SQLITE_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every dialect; naive values are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("the store takes timezone-aware datetimes only")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.strftime(_SQLITE_FORMAT)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.strptime(value, _SQLITE_FORMAT).replace(tzinfo=UTC)
        if not isinstance(value, datetime):
            raise TypeError(f"unexpected datetime value from the database: {type(value)}")
        return value.astimezone(UTC)


metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String, nullable=False),
    Column("applied_at", UtcDateTime, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("user_key", String, primary_key=True),  # the exact id the console reports
    Column("email", String),
    Column("role", String),
    Column("first_seen", UtcDateTime, nullable=False),
    Column("last_seen", UtcDateTime, nullable=False),
)

# Per-user MFA identity, apart from ``users`` (the console's view of the user, which needs
# first/last-seen times) so that the generation can be bumped and the WebAuthn handle created
# for any user key, whether or not ``touch_user`` has recorded the user.
user_mfa = Table(
    "user_mfa",
    metadata,
    Column("user_key", String, primary_key=True),
    Column("mfa_generation", Integer, nullable=False),
    Column("webauthn_handle", LargeBinary, unique=True),
)

# One grace clock per user; a policy change that starts or lifts the user's requirement
# removes it (in the same transaction as the change).
grace = Table(
    "grace",
    metadata,
    Column("user_key", String, primary_key=True),
    Column("started_at", UtcDateTime, nullable=False),
)

totp = Table(
    "totp",
    metadata,
    Column("user_key", String, primary_key=True),
    Column("secret_encrypted", Text, nullable=False),  # Fernet token
    Column("last_step", BigInteger),
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_used_at", UtcDateTime),
)

pending_totp = Table(
    "pending_totp",
    metadata,
    Column("user_key", String, primary_key=True),
    Column("secret_encrypted", Text, nullable=False),  # Fernet token
    Column("session_id", String, nullable=False),  # the sidecar session that began it
    Column("created_at", UtcDateTime, nullable=False),
)

recovery_codes = Table(
    "recovery_codes",
    metadata,
    Column("user_key", String, primary_key=True),
    Column("code_hash", LargeBinary, primary_key=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("used_at", UtcDateTime),
)

passkeys = Table(
    "passkeys",
    metadata,
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

challenges = Table(
    "challenges",
    metadata,
    Column("id", String, primary_key=True),
    Column("user_key", String, nullable=False),
    Column("session_id", String, nullable=False),
    Column("purpose", String, nullable=False),
    Column("challenge", LargeBinary, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Index("ix_challenges_expires_at", "expires_at"),
)

# One row per counted key (``user:<key>``, ``ip:<address>``): a fixed window that starts at
# the first failure (its end fixed then, from the window length configured at the time), the
# failures inside it, and the end of the ban once the count reached the limit.
lockout = Table(
    "lockout",
    metadata,
    Column("key", String, primary_key=True),
    Column("window_start", UtcDateTime, nullable=False),
    Column("window_end", UtcDateTime, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("locked_until", UtcDateTime),
)

security_settings = Table(
    "security_settings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("mfa_policy", String, nullable=False),
    Column("grace_period_seconds", Float, nullable=False),
    Column("ip_allowlist", Text, nullable=False),  # JSON list of strings
    Column("ip_denylist", Text, nullable=False),  # JSON list of strings
    Column("version", Integer, nullable=False),
    Column("updated_by", String),
    Column("updated_at", UtcDateTime, nullable=False),
)

audit = Table(
    "audit",
    metadata,
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

# Written once by the migration to exact user ids (version 2): which case-folded keys were
# re-keyed to which exact id, for `sidecar store check`.
rekeyed_users = Table(
    "rekeyed_users",
    metadata,
    Column("old_key", String, primary_key=True),
    Column("new_id", String, nullable=False),
    Column("rekeyed_at", UtcDateTime, nullable=False),
)

# Console credentials (the session binding hash) that verified MFA for a user. A reset revokes
# them all: a browser holding one of those console sessions cannot enroll the account's first
# factor afterwards (sign in to the console again first). Rows expire with their session.
verified_bindings = Table(
    "verified_bindings",
    metadata,
    Column("user_key", String, primary_key=True),
    Column("binding", String, primary_key=True),
    Column("last_verified", UtcDateTime, nullable=False),
    Column("revoked", Boolean, nullable=False),
)
