"""The hash-chained audit trail (``AuditStore``); the chain itself is ``sidecar.store.chain``."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from sqlalchemy import RowMapping, select

from sidecar.store import chain, schema
from sidecar.store.base import AuditEntry
from sidecar.store.db import LOCK_AUDIT, Database


class SqlAudit:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(
        self,
        *,
        time: datetime,
        actor: str | None,
        client_ip: str | None,
        action: str,
        target: str | None,
        outcome: str,
        details: str,
    ) -> AuditEntry:
        audit = schema.audit
        time = datetime.fromisoformat(chain.canonical_time(time))  # aware UTC, or ValueError
        async with self._db.transaction(write=True, operation="audit.append") as conn:
            # Read-then-insert must not interleave with another writer: on PostgreSQL the
            # advisory lock serializes appenders; on SQLite this transaction began IMMEDIATE.
            await self._db.lock(conn, LOCK_AUDIT)
            last = (
                await conn.execute(
                    select(audit.c.seq, audit.c.hash).order_by(audit.c.seq.desc()).limit(1)
                )
            ).one_or_none()
            seq, prev_hash = (last.seq + 1, last.hash) if last is not None else (1, chain.GENESIS)
            entry = AuditEntry(
                seq=seq,
                time=time,
                actor=actor,
                client_ip=client_ip,
                action=action,
                target=target,
                outcome=outcome,
                details=details,
                prev_hash=prev_hash,
                hash=chain.record_hash(
                    prev_hash, seq, time, actor, client_ip, action, target, outcome, details
                ),
            )
            await conn.execute(audit.insert().values(**dataclasses.asdict(entry)))
        return entry

    async def entries(
        self,
        *,
        limit: int,
        action: str | None = None,
        actor: str | None = None,
        before_seq: int | None = None,
    ) -> list[AuditEntry]:
        audit = schema.audit
        query = select(audit).order_by(audit.c.seq.desc()).limit(max(limit, 0))
        if action is not None:
            query = query.where(audit.c.action == action)
        if actor is not None:
            query = query.where(audit.c.actor == actor)
        if before_seq is not None:
            query = query.where(audit.c.seq < before_seq)
        async with self._db.transaction(write=False, operation="audit.entries") as conn:
            return [_audit(row) for row in (await conn.execute(query)).mappings()]

    async def all(self) -> list[AuditEntry]:
        audit = schema.audit
        async with self._db.transaction(write=False, operation="audit.all") as conn:
            rows = await conn.execute(select(audit).order_by(audit.c.seq))
            return [_audit(row) for row in rows.mappings()]


def _audit(row: RowMapping) -> AuditEntry:
    return AuditEntry(
        seq=row["seq"],
        time=row["time"],
        actor=row["actor"],
        client_ip=row["client_ip"],
        action=row["action"],
        target=row["target"],
        outcome=row["outcome"],
        details=row["details"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )
