"""The audit hash chain: each record's hash covers its fields and the previous record's hash.

Pure functions, no I/O: the store uses ``record_hash`` when appending and ``sidecar audit
verify`` uses ``verify_chain`` over the records read back. Changing the canonical form breaks
every existing chain, so it is fixed here: SHA-256 over compact JSON with sorted keys (ASCII
only), the time as ISO-8601 UTC with microseconds (``2024-05-01T12:00:00.000000+00:00``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sidecar.store.base import AuditEntry

#: The ``prev_hash`` of the first record.
GENESIS = "0" * 64


def canonical_time(time: datetime) -> str:
    """The form a record's time takes inside the hash (timezone-aware input only)."""
    if time.tzinfo is None or time.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    return time.astimezone(UTC).isoformat(timespec="microseconds")


def record_hash(
    prev_hash: str,
    seq: int,
    time: datetime,
    actor: str | None,
    client_ip: str | None,
    action: str,
    target: str | None,
    outcome: str,
    details: str,
) -> str:
    """The SHA-256 hex digest chaining one record to ``prev_hash``."""
    fields = {
        "prev_hash": prev_hash,
        "seq": seq,
        "time": canonical_time(time),
        "actor": actor,
        "client_ip": client_ip,
        "action": action,
        "target": target,
        "outcome": outcome,
        "details": details,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def entry_hash(entry: AuditEntry) -> str:
    """``record_hash`` recomputed from a stored entry's fields."""
    return record_hash(
        entry.prev_hash,
        entry.seq,
        entry.time,
        entry.actor,
        entry.client_ip,
        entry.action,
        entry.target,
        entry.outcome,
        entry.details,
    )


def verify_chain(entries: Iterable[AuditEntry]) -> int | None:
    """The sequence number of the first record that breaks the chain, or None if it holds.

    ``entries`` are oldest first. A record breaks the chain when its ``seq`` is not the
    previous one plus one (the first is 1), its ``prev_hash`` is not the previous record's
    hash (``GENESIS`` for the first), or its own hash does not match its fields. A deleted
    or edited record therefore shows up at or right after the place it was changed.
    """
    expected_seq = 1
    prev = GENESIS
    for entry in entries:
        if entry.seq != expected_seq or entry.prev_hash != prev or entry.hash != entry_hash(entry):
            return entry.seq
        expected_seq += 1
        prev = entry.hash
    return None


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One line of the audit file: chained (``seq`` and ``hash``) or not (written while the
    store could not be reached)."""

    line: int
    seq: int | None
    hash: str | None
    time: str
    action: str
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """The audit file held against the store's chain.

    ``missing`` and ``changed``: chained file records the store lacks or holds differently,
    not explained by a restore: tampering (or a truncated store). ``lost_at_restore``:
    chained records written after the backup a restore went back to (the ``store.restored``
    record in both the store and the file marks the restore point). ``file_only``: records
    written while the store was unavailable, which were never chained."""

    missing: list[FileRecord] = field(default_factory=list)
    changed: list[FileRecord] = field(default_factory=list)
    lost_at_restore: list[tuple[FileRecord, FileRecord]] = field(default_factory=list)
    restores: list[FileRecord] = field(default_factory=list)
    file_only: list[FileRecord] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.missing and not self.changed


def reconcile(entries: Sequence[AuditEntry], file_records: Iterable[FileRecord]) -> Reconciliation:
    """Compare the audit file, line by line, with the store's records (oldest first).

    A ``store.restored`` record (``details.restored_last_seq``) says the store went back to
    a backup ending at that sequence number: chained lines before it in the file with a
    higher number were lost with the newer store, not tampered with. Every other chained
    line must be in the store, unchanged.
    """
    stored = {e.seq: e.hash for e in entries}
    out = Reconciliation()
    pending: list[FileRecord] = []
    for record in file_records:
        if record.seq is None:
            out.file_only.append(record)
            continue
        if record.action == "store.restored":
            back_to = record.details.get("restored_last_seq")
            if isinstance(back_to, int) and stored.get(record.seq) == record.hash:
                out.restores.append(record)
                out.lost_at_restore.extend(
                    (p, record) for p in pending if p.seq and p.seq > back_to
                )
                pending = [p for p in pending if p.seq is not None and p.seq <= back_to]
        pending.append(record)
    for record in pending:
        if record.seq not in stored:
            out.missing.append(record)
        elif stored[record.seq] != record.hash:
            out.changed.append(record)
    return out
