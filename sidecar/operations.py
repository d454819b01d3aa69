"""Break-glass and maintenance commands that work on the store directly (no server needed):
``sidecar audit verify``, ``sidecar users reset-mfa``, ``sidecar security show|set``.

Each change is audited with actor ``cli``; replicas pick settings changes up within seconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
from sidecar.store.chain import verify_chain

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


def _last_file_record(path: str) -> dict[str, object] | None:
    """The last chained record the audit file holds (it has ``seq`` and ``hash``)."""
    if path == "-" or not Path(path).is_file():
        return None
    last: dict[str, object] | None = None
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "seq" in record and "hash" in record:
                last = record
    return last


async def audit_verify(config: Config) -> tuple[bool, str]:
    async with _store(config) as store:
        entries = await store.audit.all()
    broken = verify_chain(entries)
    if broken is None:
        # The chain cannot show records cut off at its end; the file's copy can.
        tail = _last_file_record(config.audit.file)
        if tail is not None:
            seq = tail["seq"]
            stored = next((e for e in entries if e.seq == seq), None)
            if stored is None or stored.hash != tail["hash"]:
                return False, (
                    f"audit chain BROKEN at its end: {config.audit.file} records seq {seq}, "
                    f"which the store {'does not hold' if stored is None else 'holds changed'}"
                    f" (the store ends at seq {entries[-1].seq if entries else 0})"
                )
        last = entries[-1].hash[:16] if entries else "-"
        return True, f"audit chain intact: {len(entries)} records (last hash {last}...)"
    return False, (
        f"audit chain BROKEN at record {broken}: it was edited, deleted, reordered or "
        "inserted out of order (records before it verify)"
    )


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
