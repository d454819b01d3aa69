"""The audit trail: one record per security-relevant event, in the store and in a file.

Each record is appended to the store, chained by hash to the previous one (sequence, time,
actor, client address, action, target, outcome, details; see ``sidecar.store.chain``), and
written as a JSON line to ``audit.file`` (``-`` = stdout) with its sequence number and hash.
``sidecar audit verify`` recomputes the chain. When the store cannot be written the line
still goes to the file, marked ``"chained": false``, and the failure is logged and counted:
an outage must not erase the record of what happened during it. Never put secrets, codes,
cookies or full credential ids in a record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter

from sidecar.store.base import Store, StoreUnavailable

log = logging.getLogger("sidecar.audit")


class AuditLog:
    """Appends audit records; each file write is flushed so a crash loses nothing written."""

    def __init__(self, file: str, registry: CollectorRegistry, store: Store | None) -> None:
        self._path = file
        self._store = store
        self._stream: IO[str] | None = None
        # One writer at a time keeps file lines in the store's sequence order.
        self._lock = asyncio.Lock()
        self.events_total = Counter(
            "sidecar_audit_events_total",
            "Audit records written, by action",
            ["action"],
            registry=registry,
        )
        self.failures_total = Counter(
            "sidecar_audit_store_failures_total",
            "Audit records that could not be written to the store or to the audit file",
            registry=registry,
        )

    def _out(self) -> IO[str]:
        if self._stream is None:
            self._stream = (
                sys.stdout if self._path == "-" else open(self._path, "a", encoding="utf-8")  # noqa: SIM115
            )
        return self._stream

    async def record(
        self,
        action: str,
        *,
        actor: str | None,
        client_ip: str | None,
        outcome: str = "success",
        target: str | None = None,
        **details: Any,
    ) -> None:
        now = datetime.now(UTC)
        details_json = json.dumps(details, default=str, sort_keys=True, separators=(",", ":"))
        entry: dict[str, Any] = {
            "time": now.isoformat(timespec="microseconds"),
            "action": action,
            "actor": actor,
            "client_ip": client_ip,
            "target": target,
            "outcome": outcome,
            "details": details,
        }
        async with self._lock:
            if self._store is not None:
                try:
                    stored = await self._store.audit.append(
                        time=now,
                        actor=actor,
                        client_ip=client_ip,
                        action=action,
                        target=target,
                        outcome=outcome,
                        details=details_json,
                    )
                except StoreUnavailable as exc:
                    self.failures_total.inc()
                    log.error("audit record not stored (kept in the file): %s", exc)
                    entry["chained"] = False
                else:
                    entry["seq"] = stored.seq
                    entry["hash"] = stored.hash
            try:
                out = self._out()
                out.write(json.dumps(entry, default=str, separators=(",", ":")) + "\n")
                out.flush()
            except OSError as exc:
                # The action itself is done (and in the store when it could be written):
                # failing the request now would hide its result, e.g. recovery codes.
                self.failures_total.inc()
                log.error("audit record not written to %s: %s", self._path, exc)
        self.events_total.labels(action).inc()

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()
        self._stream = None
