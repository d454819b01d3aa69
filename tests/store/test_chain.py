"""The audit hash chain, without a database."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.store import AuditEntry
from sidecar.store.chain import (
    GENESIS,
    FileRecord,
    canonical_time,
    reconcile,
    record_hash,
    verify_chain,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def build(n: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        fields = {
            "time": T0 + timedelta(seconds=seq),
            "actor": "alice",
            "client_ip": "203.0.113.9",
            "action": "mfa.verify",
            "target": None,
            "outcome": "success",
            "details": f'{{"n":{seq}}}',
        }
        digest = record_hash(prev, seq, **fields)  # type: ignore[arg-type]
        entries.append(AuditEntry(seq=seq, prev_hash=prev, hash=digest, **fields))  # type: ignore[arg-type]
        prev = digest
    return entries


def test_the_canonical_form() -> None:
    # Pins the form an outside verifier can reproduce; changing it breaks every chain written.
    canonical = (
        '{"action":"mfa.verify","actor":"alice","client_ip":null,"details":"{\\"k\\":\\"\\u00e9\\"}",'
        '"outcome":"success","prev_hash":"' + GENESIS + '","seq":1,"target":null,'
        '"time":"2030-01-01T12:00:00.000000+00:00"}'
    )
    digest = record_hash(
        GENESIS, 1, T0, "alice", None, "mfa.verify", None, "success", '{"k":"\u00e9"}'
    )
    assert digest == hashlib.sha256(canonical.encode("ascii")).hexdigest()
    assert digest == "0fa99aadac28b1fb615cced103a106464a726581599f4b9e5911c2600bad83f8"


def test_time_is_hashed_as_the_instant() -> None:
    local = T0.astimezone(timezone(timedelta(hours=-5)))
    assert canonical_time(local) == "2030-01-01T12:00:00.000000+00:00"
    assert record_hash(GENESIS, 1, local, None, None, "a", None, "ok", "{}") == record_hash(
        GENESIS, 1, T0, None, None, "a", None, "ok", "{}"
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        canonical_time(datetime(2030, 1, 1))


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 2},
        {"time": T0 + timedelta(microseconds=1)},
        {"actor": "bob"},
        {"actor": None},
        {"client_ip": "203.0.113.10"},
        {"action": "mfa.enroll"},
        {"target": "alice"},
        {"outcome": "failure"},
        {"details": '{"n":2}'},
        {"prev_hash": "1" * 64},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_field_is_covered(change: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "prev_hash": GENESIS,
        "seq": 1,
        "time": T0,
        "actor": "alice",
        "client_ip": "203.0.113.9",
        "action": "mfa.verify",
        "target": None,
        "outcome": "success",
        "details": '{"n":1}',
    }
    assert record_hash(**{**fields, **change}) != record_hash(**fields)  # type: ignore[arg-type]


def test_null_and_text_null_differ() -> None:
    assert record_hash(GENESIS, 1, T0, None, None, "a", None, "ok", "{}") != record_hash(
        GENESIS, 1, T0, "null", None, "a", None, "ok", "{}"
    )


def test_an_intact_chain_verifies() -> None:
    assert verify_chain([]) is None
    assert verify_chain(build(5)) is None


@pytest.mark.parametrize(
    ("tamper", "broken_at"),
    [
        (lambda es: es[:2] + es[3:], 4),  # a record deleted
        (lambda es: es[1:], 2),  # the first record deleted
        (lambda es: [es[0], es[2], es[1], *es[3:]], 3),  # reordered
        (lambda es: [*es[:2], dataclasses.replace(es[2], outcome="failure"), *es[3:]], 3),
        # Re-hashing an edited record does not help: the next one still points at the old hash.
        (
            lambda es: [
                *es[:2],
                dataclasses.replace(
                    es[2],
                    actor="mallory",
                    hash=record_hash(
                        es[2].prev_hash,
                        3,
                        es[2].time,
                        "mallory",
                        es[2].client_ip,
                        es[2].action,
                        es[2].target,
                        es[2].outcome,
                        es[2].details,
                    ),
                ),
                *es[3:],
            ],
            4,
        ),
    ],
    ids=["deleted", "first-deleted", "reordered", "edited", "edited-and-rehashed"],
)
def test_tampering_is_found(tamper: object, broken_at: int) -> None:
    assert callable(tamper)
    assert verify_chain(tamper(build(5))) == broken_at


@given(
    index=st.integers(min_value=0, max_value=3),
    field=st.sampled_from(["actor", "client_ip", "action", "target", "outcome", "details"]),
    value=st.text(max_size=20),
)
def test_any_single_edit_is_found(index: int, field: str, value: str) -> None:
    entries = build(4)
    if getattr(entries[index], field) == value:
        return
    entries[index] = dataclasses.replace(entries[index], **{field: value})  # type: ignore[arg-type]
    assert verify_chain(entries) == index + 1


def _file(seq: int | None, digest: str | None, action: str = "x", **details: object) -> FileRecord:
    return FileRecord(line=0, seq=seq, hash=digest, time="t", action=action, details=details)


def _chain(n: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        digest = record_hash(prev, seq, T0, None, None, "x", None, "success", "{}")
        entries.append(AuditEntry(seq, T0, None, None, "x", None, "success", "{}", prev, digest))
        prev = digest
    return entries


def test_reconcile_tells_restores_from_tampering() -> None:
    store = _chain(6)  # after a restore to seq 3, seq 4 is the store.restored record
    h = {e.seq: e.hash for e in store}
    lines = [
        *(_file(s, h[s]) for s in (1, 2, 3)),
        _file(4, "old-4"),  # written before the restore, lost with the newer store
        _file(5, "old-5"),
        _file(None, None, "mfa.verify"),  # the store was down
        _file(4, h[4], "store.restored", restored_last_seq=3),
        _file(5, h[5]),
        _file(6, h[6]),
    ]
    report = reconcile(store, lines)
    assert report.intact
    assert [r.seq for r in report.restores] == [4]
    assert [p.seq for p, _ in report.lost_at_restore] == [4, 5]
    assert [r.action for r in report.file_only] == ["mfa.verify"]

    # Without the restore record, the same file is tampering.
    tampered = reconcile(store, [line for line in lines if line.action != "store.restored"])
    assert not tampered.intact
    assert [r.seq for r in tampered.changed] == [4, 5]
    # A forged restore record (not in the store) explains nothing.
    forged = [*lines[:5], _file(4, "forged", "store.restored", restored_last_seq=3)]
    assert not reconcile(store, forged).intact
    # Records the store lacks, without a restore, are missing.
    assert [r.seq for r in reconcile(_chain(3), lines[:5]).missing] == [4, 5]
