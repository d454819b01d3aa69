"""Break-glass and maintenance commands that work on the store directly (no server needed):
``sidecar audit verify``, ``sidecar users reset-mfa``, ``sidecar security show|set``.

Each change is audited with actor ``cli``; replicas pick settings changes up within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar.audit import AuditLog
from sidecar.config import Config, parse_duration
from sidecar.mfa.admin import settings_json, validate_lines
from sidecar.mfa.policy import MfaPolicy
from sidecar.mfa.service import Actor, MfaMetrics, MfaService
from sidecar.settings import SettingsService, settings_changes, settings_from_config
from sidecar.store import open_store
from sidecar.store.base import Store, StoreUnavailable
from sidecar.store.chain import FileRecord, reconcile, verify_chain
from sidecar.store.migrations import LATEST_VERSION
from sidecar.store.sql import SqlStore

CLI_ACTOR = Actor("cli", None)


@asynccontextmanager
async def _store(config: Config) -> AsyncIterator[Store]:
    store = open_store(config.storage.url, config.storage.encryption_key)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()
        # aiosqlite answers its last call from its own thread; give that answer a moment
        # to arrive before asyncio.run() closes the loop under it (CLI commands).
        await asyncio.sleep(0.05)


def file_records(path: str) -> list[FileRecord]:
    """The audit file's records, in the order written (unparseable lines skipped)."""
    if path == "-" or not Path(path).is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            seq, digest = record.get("seq"), record.get("hash")
            details = record.get("details")
            records.append(
                FileRecord(
                    line=number,
                    seq=seq if isinstance(seq, int) else None,
                    hash=digest if isinstance(digest, str) else None,
                    time=str(record.get("time", "")),
                    action=str(record.get("action", "")),
                    details=details if isinstance(details, dict) else {},
                )
            )
    return records


def _span(records: list[FileRecord]) -> str:
    seqs = sorted(r.seq for r in records if r.seq is not None)
    return f"seq {seqs[0]}" if len(seqs) == 1 else f"seq {seqs[0]}..{seqs[-1]}"


async def audit_verify(config: Config) -> tuple[bool, str]:
    """The store's hash chain, then the audit file held against it (``reconcile``)."""
    async with _store(config) as store:
        entries = await store.audit.all()
    broken = verify_chain(entries)
    if broken is not None:
        return False, (
            f"audit chain BROKEN at record {broken}: it was edited, deleted, reordered or "
            "inserted out of order (records before it verify)"
        )
    report = reconcile(entries, file_records(config.audit.file))
    last = entries[-1].hash[:16] if entries else "-"
    lines = [f"audit chain intact in the store: {len(entries)} records (last hash {last}...)"]
    for restore in report.restores:
        lost = [p for p, r in report.lost_at_restore if r is restore]
        lines.append(
            f"restore point: seq {restore.seq} at {restore.time} (store.restored, back to "
            f"seq {restore.details.get('restored_last_seq')} from "
            f"{restore.details.get('backup', 'a backup')})"
            + (
                f"; {len(lost)} records written after that backup were lost with the store "
                f"({_span(lost)}; their text is in {config.audit.file}, lines "
                f"{lost[0].line}..{lost[-1].line})"
                if lost
                else ""
            )
        )
    if report.file_only:
        first, final = report.file_only[0], report.file_only[-1]
        lines.append(
            f"{len(report.file_only)} records exist only in {config.audit.file} (written "
            f"while the store was unavailable, never chained), {first.time} to {final.time}: "
            + ", ".join(sorted({r.action for r in report.file_only}))
        )
    if not report.intact:
        for label, records in (
            ("does not hold", report.missing),
            ("holds changed", report.changed),
        ):
            if records:
                lines.append(
                    f"audit chain BROKEN: {config.audit.file} records {_span(records)}, which "
                    f"the store {label} (the store ends at seq {entries[-1].seq if entries else 0}"
                    "; no store.restored record explains it)"
                )
        return False, "\n".join(lines)
    return True, "\n".join(lines)


async def store_backup(config: Config, target: Path) -> tuple[bool, str]:
    """An online backup of the SQLite store, recorded in the audit trail (what it holds)."""
    if not config.storage.url.startswith("sqlite"):
        return False, (
            "the store is PostgreSQL: back it up with pg_dump, e.g. "
            "`pg_dump --format=custom --file=sidecar.dump <storage.url>` (see the runbook)"
        )
    async with _store(config) as store:
        assert isinstance(store, SqlStore)
        await store.backup(target)
        entries = await store.audit.entries(limit=1)
        audit = AuditLog(config.audit.file, CollectorRegistry(), store)
        try:
            await audit.record(
                "store.backup",
                actor="cli",
                client_ip=None,
                target=str(target),
                last_seq=entries[0].seq if entries else 0,
                last_hash=entries[0].hash if entries else None,
            )
        finally:
            audit.close()
    size = await asyncio.to_thread(os.path.getsize, target)
    last_seq = entries[0].seq if entries else 0
    return True, f"backed up to {target} ({size} bytes, audit records up to seq {last_seq})"


async def store_restore(config: Config, source: Path | None) -> tuple[bool, str]:
    """Put a backup in place (SQLite) or mark a restore done with pg_restore (PostgreSQL),
    and record a ``store.restored`` audit event: the restore point ``audit verify`` shows
    (records written after the backup are then "lost at a restore", not tampering)."""
    sqlite_file = _sqlite_path(config)
    if sqlite_file is not None:
        if source is None:
            return False, "give the backup file to restore: sidecar store restore FILE"
        problem = await asyncio.to_thread(_restore_sqlite, source, sqlite_file)
        if problem is not None:
            return False, problem
    elif source is not None:
        return False, (
            "the store is PostgreSQL: restore it with pg_restore first, then run "
            "`sidecar store restore --config FILE` (without a file) to record the restore"
        )
    async with _store(config) as store:
        entries = await store.audit.entries(limit=1)
        audit = AuditLog(config.audit.file, CollectorRegistry(), store)
        try:
            await audit.record(
                "store.restored",
                actor="cli",
                client_ip=None,
                target="store",
                backup=str(source) if source is not None else "pg_restore",
                restored_last_seq=entries[0].seq if entries else 0,
                restored_last_hash=entries[0].hash if entries else None,
            )
        finally:
            audit.close()
    back_to = entries[0].seq if entries else 0
    return True, (
        f"restored: the store holds audit records up to seq {back_to} and a store.restored "
        "record after them; start the sidecar again, then run `sidecar audit verify`"
    )


def _sqlite_path(config: Config) -> Path | None:
    store = open_store(config.storage.url, config.storage.encryption_key)
    assert isinstance(store, SqlStore)
    return store.sqlite_file


def _restore_sqlite(source: Path, live: Path) -> str | None:
    """Replace ``live`` by ``source``; the reason it cannot, or None."""
    try:
        with closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as backup:
            version = backup.execute("SELECT max(version) FROM schema_version").fetchone()[0]
    except sqlite3.Error as exc:
        return f"{source} is not a sidecar store backup ({exc})"
    if not isinstance(version, int) or version > LATEST_VERSION:
        return f"{source} holds schema version {version}, which this sidecar cannot read"
    if live.exists():
        # A running sidecar keeps connections open: exclusive access is refused then, and
        # a file copied over a database in use would be silently ignored by that process.
        try:
            with closing(sqlite3.connect(live, timeout=0.5, isolation_level=None)) as probe:
                probe.execute("PRAGMA locking_mode = EXCLUSIVE")
                probe.execute("BEGIN EXCLUSIVE")
                probe.execute("ROLLBACK")
        except sqlite3.Error:
            return f"{live} is in use: stop every sidecar using it first, then restore"
    staged = live.with_name(live.name + ".restoring")
    shutil.copyfile(source, staged)
    for leftover in (live.with_name(live.name + "-wal"), live.with_name(live.name + "-shm")):
        leftover.unlink(missing_ok=True)
    os.replace(staged, live)
    return None


async def reset_mfa(config: Config, user_id: str) -> str:
    async with _store(config) as store:
        audit = AuditLog(config.audit.file, CollectorRegistry(), store)
        try:
            service = MfaService(
                store=store, config=config, audit=audit, metrics=MfaMetrics(CollectorRegistry())
            )
            removed = await service.reset(user_id, CLI_ACTOR)
        finally:
            audit.close()
    return (
        f"removed every MFA method of {user_id}; their verified sessions end, and they enroll "
        "again when the MFA policy requires it of them"
        if removed
        else f"{user_id} had no MFA methods; nothing removed (recorded in the audit log)"
    )


async def security_show(config: Config) -> str:
    """The live settings, read-only (nothing is seeded or written)."""
    async with _store(config) as store:
        current = await store.settings.current()
    if current is None:
        current = settings_from_config(config, now=datetime.now(UTC))
        note = "\n(not in the store yet: these are the YAML's values, seeded at first start)"
    else:
        note = ""
    return json.dumps(settings_json(current, config.security.managed_by), indent=2) + note


async def live_ip_lists(config: Config) -> tuple[list[str], list[str], str]:
    """The IP lists the running sidecars enforce, and where they came from."""
    yaml_lists = (
        [str(n) for n in config.security.ip_allowlist],
        [str(n) for n in config.security.ip_denylist],
    )
    if config.security.managed_by == "config":
        return (*yaml_lists, "the YAML (security.managed_by: config)")
    try:
        async with _store(config) as store:
            current = await store.settings.current()
    except StoreUnavailable as exc:
        return (*yaml_lists, f"the YAML: the store is unreachable ({exc}), live lists may differ")
    if current is None:
        return (*yaml_lists, "the YAML (not seeded into the store yet)")
    return (
        list(current.ip_allowlist),
        list(current.ip_denylist),
        f"the store (version {current.version}, edited on the Security page)",
    )


async def security_set(
    config: Config,
    *,
    mfa_policy: str | None,
    grace_period: str | None,
    allowlist: list[str] | None,
    denylist: list[str] | None,
) -> tuple[bool, str]:
    problems: list[str] = []
    if mfa_policy is not None and mfa_policy not in {p.value for p in MfaPolicy}:
        problems.append(f"--mfa-policy {mfa_policy!r}: must be optional, admins or all")
    grace: float | None = None
    if grace_period is not None:
        try:
            grace = parse_duration(grace_period)
        except ValueError as exc:
            problems.append(f"--grace-period {grace_period!r}: {exc}")
    lists: dict[str, list[str]] = {}
    for name, given in (("ip_allowlist", allowlist), ("ip_denylist", denylist)):
        if given is not None:
            good, errors = validate_lines(name, given)
            problems += [f"{name} line {e['line']}: {e['value']!r} {e['reason']}" for e in errors]
            lists[name] = good
    if problems:
        return False, "\n".join(problems)
    async with _store(config) as store:
        audit = AuditLog(config.audit.file, CollectorRegistry(), store)
        try:
            settings = SettingsService(store, config, lambda _: None)
            await settings.load()
            current = settings.current
            if current is None:
                raise StoreUnavailable("no security settings in the store")
            saved = await settings.change(
                mfa_policy=mfa_policy or current.mfa_policy,
                grace_period_seconds=current.grace_period_seconds if grace is None else grace,
                ip_allowlist=tuple(lists.get("ip_allowlist", current.ip_allowlist)),
                ip_denylist=tuple(lists.get("ip_denylist", current.ip_denylist)),
                actor="cli",
                expected_version=current.version,
            )
            if saved is None:
                return False, "the settings changed while saving; run the command again"
            await audit.record(
                "security.settings.changed",
                actor="cli",
                client_ip=None,
                target="security",
                version=saved.version,
                changes=settings_changes(current, saved),
            )
        finally:
            audit.close()
    note = ""
    if config.security.managed_by == "config":
        note = (
            "\nnote: security.managed_by is config: the next start or reload writes the YAML "
            "values back; change the YAML too"
        )
    return True, json.dumps(settings_json(saved, config.security.managed_by), indent=2) + note


async def store_check(config: Config) -> str:
    """What an upgrade changed that an operator should know: the schema version, and the
    users whose MFA state was re-keyed from a case-folded id to the exact id."""
    async with _store(config) as store:
        rekeyed = await store.users.rekeyed()
    lines = [f"store: migrated to the latest schema ({config.storage.url.split('@')[-1]})"]
    if not rekeyed:
        lines.append("user ids: exact; none were re-keyed by the upgrade to exact ids")
        return "\n".join(lines)
    lines.append(
        f"user ids re-keyed by the upgrade to exact ids ({len(rekeyed)}): each MFA record "
        "kept under a case-folded key now belongs to the id last seen for it; other ids "
        "that differ from it only in case, spaces or look-alike letters shared that record "
        "before the upgrade and now have none (they enroll their own, or an admin resets "
        "the listed user if the record was not theirs):"
    )
    for user in rekeyed:
        lines.append(
            f"  {user.old_key!r} -> {user.new_id!r} (re-keyed {user.rekeyed_at:%Y-%m-%d %H:%M} UTC)"
        )
    return "\n".join(lines)
