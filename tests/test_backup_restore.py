"""Backup and restore of the SQLite store, and what ``audit verify`` makes of a restore.

The operator's sequence: ``sidecar store backup FILE`` while running; later (sidecar
stopped) ``sidecar store restore FILE``; start again; ``sidecar audit verify`` tells the
restore point (and the records lost with the newer store) from tampering.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from prometheus_client import CollectorRegistry

from sidecar.audit import AuditLog
from sidecar.cli import EXIT_FAILURE, EXIT_OK, main
from sidecar.store import SqlStore
from sidecar.store import schema as tables

NOW = datetime(2030, 1, 1, tzinfo=UTC)


class Host:
    """A sidecar host: its config file, its SQLite store and its audit file."""

    def __init__(self, tmp_path: Path) -> None:
        self.key = Fernet.generate_key().decode()
        self.database = tmp_path / "state.db"
        self.audit_file = tmp_path / "audit.jsonl"
        self.config = tmp_path / "sidecar.yaml"
        self.config.write_text(
            f"mfa: {{session: {{secret_keys: [{self.key}]}}}}\n"
            f"storage: {{url: 'sqlite:///{self.database}', encryption_key: {self.key}}}\n"
            f"audit: {{file: '{self.audit_file}'}}\n"
        )

    def store(self) -> SqlStore:
        return SqlStore(f"sqlite:///{self.database}", self.key)

    async def record(self, store: SqlStore, count: int, action: str = "test.event") -> None:
        audit = AuditLog(str(self.audit_file), CollectorRegistry(), store)
        try:
            for i in range(count):
                await audit.record(action, actor="u-test", client_ip=None, n=i)
        finally:
            audit.close()

    async def cli(self, *args: str) -> int:
        """A CLI command as the operator runs it (its own event loop, in a thread)."""
        return await asyncio.to_thread(main, [*args, "--config", str(self.config)])


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def rows(database: Path, table: str) -> int:
    """Rows of ``table`` in a database file read on its own (0 when the table is missing)."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        try:
            count: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
        except sqlite3.OperationalError:
            return 0
        return count


async def test_an_online_backup_holds_what_the_write_ahead_log_holds(
    host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = host.store()
    await store.migrate()
    await host.record(store, 20)
    await store.users.touch("u-kate", email=None, role=None, now=NOW)
    try:
        # The sidecar is running (this store is open): a plain copy of the file misses what
        # is still in the write-ahead log...
        naive = tmp_path / "copy.db"
        shutil.copyfile(host.database, naive)
        assert rows(naive, "audit") < 20
        # ...the backup command does not.
        assert await host.cli("store", "backup", str(tmp_path / "backup.db")) == EXIT_OK
        assert "backed up to" in capsys.readouterr().out
    finally:
        await store.close()
    backup = tmp_path / "backup.db"
    assert rows(backup, "audit") == 20
    assert rows(backup, "users") == 1
    assert not (tmp_path / "backup.db-wal").exists()
    # The backup itself is on record.
    records = [json.loads(line) for line in host.audit_file.read_text().splitlines()]
    assert records[-1]["action"] == "store.backup"
    assert records[-1]["details"]["last_seq"] == 20


async def test_restore_then_verify_names_the_restore_point_and_what_was_lost(
    host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = host.store()
    await store.migrate()
    await host.record(store, 10)
    await store.close()
    assert await host.cli("store", "backup", str(tmp_path / "backup.db")) == EXIT_OK
    store = host.store()
    await host.record(store, 5, "after.backup")  # seq 12..16: in the file and the store
    await store.close()
    capsys.readouterr()

    assert await host.cli("store", "restore", str(tmp_path / "backup.db")) == EXIT_OK
    assert "restored" in capsys.readouterr().out
    store = host.store()
    await host.record(store, 3, "after.restore")  # the sidecar runs again
    await store.close()

    assert await host.cli("audit", "verify") == EXIT_OK
    out = capsys.readouterr().out
    # The backup held seq 1..10 (its own store.backup record came after it): 11..16 were
    # written after the backup and went with the newer store.
    assert "restore point: seq 11" in out
    assert "back to seq 10" in out
    assert "6 records written after that backup were lost" in out
    assert "BROKEN" not in out


async def test_tampering_is_still_broken_and_not_a_restore(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    store = host.store()
    await store.migrate()
    await host.record(store, 6)
    await store.close()
    # Records cut off the end of the store, without a store.restored record.
    with closing(sqlite3.connect(host.database)) as conn:
        conn.execute(f"DELETE FROM {tables.audit.name} WHERE seq > 4")  # noqa: S608
        conn.commit()
    assert await host.cli("audit", "verify") == EXIT_FAILURE
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "BROKEN" in out
    assert "seq 5..6" in out


async def test_records_written_while_the_store_was_down_are_reported(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    store = host.store()
    await store.migrate()
    await host.record(store, 2)
    await store.close()
    with host.audit_file.open("a") as file:
        for action in ("mfa.verify", "ip.blocked"):
            file.write(
                json.dumps(
                    {
                        "time": "2030-01-01T00:00:00+00:00",
                        "action": action,
                        "chained": False,
                        "details": {},
                    }
                )
                + "\n"
            )
    assert await host.cli("audit", "verify") == EXIT_OK
    out = capsys.readouterr().out
    assert "2 records exist only in" in out
    assert "ip.blocked, mfa.verify" in out


async def test_a_restore_over_a_database_in_use_is_refused(
    host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = host.store()
    await store.migrate()
    await host.record(store, 2)
    await store.close()
    assert await host.cli("store", "backup", str(tmp_path / "backup.db")) == EXIT_OK
    running = host.store()
    await running.ping()  # a running sidecar keeps connections open
    try:
        assert await host.cli("store", "restore", str(tmp_path / "backup.db")) == EXIT_FAILURE
        assert "is in use" in capsys.readouterr().err
    finally:
        await running.close()


async def test_what_is_not_a_backup_is_refused(
    host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    assert await host.cli("store", "restore", str(junk)) == EXIT_FAILURE
    assert "is not a sidecar store backup" in capsys.readouterr().err
