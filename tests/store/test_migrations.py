"""Upgrading a version-1 database (case-folded user keys, grace clocks per policy epoch)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from sidecar.cli import EXIT_OK, main
from sidecar.store import SqlStore
from sidecar.store import schema as tables
from sidecar.store.migrations import MIGRATIONS
from tests.store.support import StoreTarget

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
STAMP = "2030-01-01T12:00:00.000000Z"


async def version_1(store: SqlStore) -> None:
    """The schema and data as version 1 left them."""
    async with store.engine.begin() as conn:
        await conn.run_sync(lambda sync: tables.schema_version.create(sync))
        await conn.run_sync(MIGRATIONS[0].apply)
        await conn.execute(
            tables.schema_version.insert().values(version=1, description="v1", applied_at=T0)
        )
        when = T0 if store.engine.dialect.name == "postgresql" else STAMP
        rows = {
            # 'kate' was last seen as 'KATE'; 'bob' as 'bob'.
            "users": [
                {"k": "kate", "d": "KATE"},
                {"k": "bob", "d": "bob"},
            ],
        }
        for row in rows["users"]:
            await conn.execute(
                text(
                    "INSERT INTO users (user_key, display_id, email, role, first_seen, last_seen)"
                    " VALUES (:k, :d, NULL, 'admin', :t, :t)"
                ),
                {**row, "t": when},
            )
        for user, epoch in (("kate", 1), ("kate", 2), ("bob", 2)):
            await conn.execute(
                text("INSERT INTO grace (user_key, epoch, started_at) VALUES (:u, :e, :t)"),
                {"u": user, "e": epoch, "t": when},
            )
        await conn.execute(
            text(
                "INSERT INTO passkeys (credential_id, user_key, public_key, sign_count,"
                " transports, aaguid, backup_eligible, backup_state, name, created_at)"
                " VALUES (:c, 'kate', :p, 0, '[]', '', false, false, 'key', :t)"
            ),
            {"c": b"cred", "p": b"pk", "t": when},
        )
        await conn.execute(
            text(
                "INSERT INTO user_mfa (user_key, mfa_generation, webauthn_handle)"
                " VALUES ('kate', 3, :h)"
            ),
            {"h": b"handle"},
        )
        await conn.execute(
            text(
                "INSERT INTO security_settings (id, mfa_policy, grace_period_seconds,"
                " ip_allowlist, ip_denylist, policy_epoch, version, updated_by, updated_at)"
                " VALUES (1, 'admins', 3600, '[]', '[]', 2, 4, NULL, :t)"
            ),
            {"t": when},
        )
        await conn.execute(
            text(
                "INSERT INTO lockout (key, window_start, window_end, failures) "
                "VALUES ('user:kate', :t, :t, 3)"
            ),
            {"t": when},
        )


async def test_state_moves_to_the_exact_id_and_the_rekey_is_reported(
    empty_target: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = empty_target.open()
    try:
        await version_1(store)
        with caplog.at_level(logging.WARNING, logger="sidecar.store"):
            await store.migrate()
        # KATE owns the state that was kept under 'kate'; 'kate' (if she exists) has none.
        assert [p.user_id for p in await store.mfa.passkeys("KATE")] == ["KATE"]
        assert await store.mfa.passkeys("kate") == []
        assert (await store.mfa.state("KATE")).mfa_generation == 3
        assert await store.mfa.user_for_handle(b"handle") == "KATE"
        assert {u.user_id for u in await store.users.all()} == {"KATE", "bob"}
        rekeyed = await store.users.rekeyed()
        assert [(r.old_key, r.new_id) for r in rekeyed] == [("kate", "KATE")]
        assert "'kate'" in caplog.text
        assert "'KATE'" in caplog.text
        # The clock of the epoch that was current (2) became each user's one clock.
        assert await store.users.grace_starts() == {"KATE": T0, "bob": T0}
        settings = await store.settings.current()
        assert settings is not None
        assert (settings.version, settings.mfa_policy) == (4, "admins")
        assert await store.lockout.status(["user:kate"], T0) == (await store.lockout.status([], T0))
    finally:
        await store.close()


async def test_store_check_lists_the_rekeyed_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Fernet.generate_key().decode()
    database = tmp_path / "state.db"
    store = SqlStore(f"sqlite:///{database}", key)
    try:
        await version_1(store)
    finally:
        await store.close()
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"mfa: {{session: {{secret_keys: [{key}]}}}}\n"
        f"storage: {{url: 'sqlite:///{database}', encryption_key: {key}}}\n"
        f"audit: {{file: '{tmp_path / 'audit.jsonl'}'}}\n"
    )
    # The CLI runs its own event loop: off this test's loop, in a thread.
    status = await asyncio.to_thread(main, ["store", "check", "--config", str(config)])
    out = capsys.readouterr().out
    assert status == EXIT_OK
    assert "re-keyed by the upgrade to exact ids (1)" in out
    assert "'kate' -> 'KATE'" in out
    # A second check: nothing new, the same report (the record stays).
    assert await asyncio.to_thread(main, ["store", "check", "--config", str(config)]) == EXIT_OK
    assert "'kate' -> 'KATE'" in capsys.readouterr().out
