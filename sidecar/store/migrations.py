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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

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
    bindparam,
    text,
)

from sidecar.store.schema import UtcDateTime

log = logging.getLogger("sidecar.store")


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


# Tables whose rows belong to one user, by the user's key.
_USER_TABLES = (
    "users",
    "user_mfa",
    "grace",
    "totp",
    "pending_totp",
    "recovery_codes",
    "passkeys",
    "challenges",
)


def _v2_exact_ids_and_grace_epochs(conn: Connection) -> None:
    """Exact user ids; one grace clock per user.

    Version 1 keyed every user's state by ``id.strip().casefold()``, so ``kate``, ``KATE`` and
    look-alikes (``\u212aate``) shared one MFA record. Each folded key is re-keyed to the exact
    id the console last reported for it (``users.display_id``); the re-keyed users are kept in
    ``rekeyed_users`` and logged: other spellings that folded to the same key shared that
    state until now and enroll their own. Keys without a ``users`` row stay as they are.
    Pending TOTP secrets and lockout counters are short-lived and are dropped.
    """
    now = datetime.now(UTC)
    md = MetaData()
    rekeyed = Table(
        "rekeyed_users",
        md,
        Column("old_key", String, primary_key=True),
        Column("new_id", String, nullable=False),
        Column("rekeyed_at", UtcDateTime, nullable=False),
    )
    md.create_all(conn, checkfirst=False)
    pairs = conn.execute(
        text("SELECT user_key, display_id FROM users WHERE user_key <> display_id")
    ).all()
    for old, new in pairs:
        moved = []
        for table in _USER_TABLES:
            clash = conn.execute(
                text(f"SELECT 1 FROM {table} WHERE user_key = :new LIMIT 1"),  # noqa: S608
                {"new": new},
            ).first()
            if clash is not None:
                log.warning(
                    "migration to exact user ids: %s already holds rows for %r; rows of the "
                    "folded key %r stay under it",
                    table,
                    new,
                    old,
                )
                continue
            result = conn.execute(
                text(f"UPDATE {table} SET user_key = :new WHERE user_key = :old"),  # noqa: S608
                {"new": new, "old": old},
            )
            if result.rowcount:
                moved.append(table)
        conn.execute(rekeyed.insert().values(old_key=old, new_id=new, rekeyed_at=now))
        log.warning(
            "migration to exact user ids: the MFA state kept under %r now belongs to %r (the "
            "id last seen); other ids that differ only in case, spaces or look-alike letters "
            "shared it until now and must enroll their own (`sidecar store check` lists these)",
            old,
            new,
        )
    conn.execute(text("ALTER TABLE users DROP COLUMN display_id"))

    # Grace: the clock of the policy epoch that was current becomes the user's one clock
    # (policy changes now remove the clocks of the users they newly require or release).
    row = conn.execute(text("SELECT policy_epoch FROM security_settings WHERE id = 1")).first()
    epoch = row[0] if row is not None else None
    grace_md = MetaData()
    Table(
        "grace_v2",
        grace_md,
        Column("user_key", String, primary_key=True),
        Column("started_at", UtcDateTime, nullable=False),
    )
    grace_md.create_all(conn, checkfirst=False)
    if epoch is not None:
        conn.execute(
            text(
                "INSERT INTO grace_v2 (user_key, started_at) "
                "SELECT user_key, started_at FROM grace WHERE epoch = :epoch"
            ).bindparams(bindparam("epoch", epoch))
        )
    conn.execute(text("DROP TABLE grace"))
    conn.execute(text("ALTER TABLE grace_v2 RENAME TO grace"))
    conn.execute(text("ALTER TABLE security_settings DROP COLUMN policy_epoch"))

    # Pending TOTP secrets are bound to the session that began them from now on.
    conn.execute(text("DROP TABLE pending_totp"))
    pending_md = MetaData()
    Table(
        "pending_totp",
        pending_md,
        Column("user_key", String, primary_key=True),
        Column("secret_encrypted", Text, nullable=False),  # Fernet token
        Column("session_id", String, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
    )
    pending_md.create_all(conn, checkfirst=False)
    conn.execute(text("DELETE FROM lockout"))  # keyed by folded ids; counters are short-lived


def _v3_verified_bindings(conn: Connection) -> None:
    md = MetaData()
    Table(
        "verified_bindings",
        md,
        Column("user_key", String, primary_key=True),
        Column("binding", String, primary_key=True),
        Column("last_verified", UtcDateTime, nullable=False),
        Column("revoked", Boolean, nullable=False),
    )
    md.create_all(conn, checkfirst=False)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _v1_initial),
    Migration(
        2,
        "exact user ids, one grace clock per user, pending TOTP bound to a session",
        _v2_exact_ids_and_grace_epochs,
    ),
    Migration(3, "console sessions that verified, revoked by a reset", _v3_verified_bindings),
)

#: The schema version this code expects.
LATEST_VERSION = MIGRATIONS[-1].version
