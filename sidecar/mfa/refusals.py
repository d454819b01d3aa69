"""Refused calls to the admin API and pages, in the audit trail: every one of them, in a
bounded number of records.

Promises:

- **Seen at once**: the first refusal of a caller, for a reason, on a route, in a window (a
  minute) is written as it happens (``admin.refused``, ``count`` 1), with the user it was
  aimed at when the route names one (``target_user``).
- **None lost**: further ones in the window are counted in memory and written by a flush
  (every ``FLUSH_SECONDS``, and at shutdown) as one record per (caller, reason, route) with
  their ``count``, ``first`` and ``last`` times and up to ``SAMPLES`` target users. The
  ``count`` of all ``admin.refused`` records adds up to the refusals.
- **Bounded**: at most ``MAX_KEYS`` (caller, reason, route) tallies per window; refusals
  beyond them go into one overflow record (counted, never dropped). So a stolen session
  probing the admin API, or a member hammering it, cannot turn it into a store-write
  amplifier: at most ``MAX_KEYS`` + 1 records per window, and one per key as it happens.
- ``sidecar_admin_refusals_total{reason}`` counts every refusal, every series from 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from sidecar.audit import AuditLog

log = logging.getLogger("sidecar.audit")

WINDOW_SECONDS = 60.0
FLUSH_SECONDS = 60.0
MAX_KEYS = 1000
SAMPLES = 5
FINAL_FLUSH_SECONDS = 5.0
REASONS = (
    "forbidden",
    "csrf",
    "step_up_required",
    "would_lock_you_out",
    "conflict",
    "invalid",
    "managed_by_config",
)


@dataclass(frozen=True, slots=True)
class RefusalKey:
    actor: str
    reason: str
    route: str  # the route's pattern, e.g. /mfa/api/admin/users/{id}/reset-mfa


@dataclass(slots=True)
class _Pending:
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    targets: list[str] = field(default_factory=list)
    client_ip: str | None = None


@dataclass(frozen=True, slots=True)
class RefusalBatch:
    key: RefusalKey | None  # None: the overflow record
    count: int
    first: float
    last: float
    targets: tuple[str, ...]
    client_ip: str | None


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


class RefusalTally:
    """The in-memory part: no I/O, ``note`` on the request path, ``take`` by the flush."""

    def __init__(self, registry: CollectorRegistry, *, max_keys: int = MAX_KEYS) -> None:
        self._max_keys = max_keys
        self._opened: dict[RefusalKey, float] = {}  # when each key's window opened
        self._pending: dict[RefusalKey, _Pending] = {}
        self._overflow = _Pending()
        self.total = Counter(
            "sidecar_admin_refusals_total",
            "Refused calls to the admin API and pages, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            self.total.labels(reason)

    def note(
        self, key: RefusalKey, *, target: str | None, client_ip: str | None, now: float
    ) -> bool:
        """Count one refusal; True when it is the first of its key in the window (the
        caller writes it now), False when the flush will."""
        self.total.labels(key.reason).inc()
        opened = self._opened.get(key)
        if opened is None or now - opened >= WINDOW_SECONDS:
            if opened is None and len(self._opened) >= self._max_keys:
                self._add(self._overflow, target, client_ip, now)
                return False
            self._opened[key] = now
            return True
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        self._add(pending, target, client_ip, now)
        return False

    @staticmethod
    def _add(pending: _Pending, target: str | None, client_ip: str | None, now: float) -> None:
        if pending.count == 0:
            pending.first = now
        pending.count += 1
        pending.last = now
        pending.client_ip = client_ip
        if target is not None and target not in pending.targets and len(pending.targets) < SAMPLES:
            pending.targets.append(target)

    def take(self, now: float) -> list[RefusalBatch]:
        """What the flush writes, and a fresh window for keys that went quiet."""
        batches = [
            RefusalBatch(key, p.count, p.first, p.last, tuple(p.targets), p.client_ip)
            for key, p in self._pending.items()
        ]
        if self._overflow.count:
            o = self._overflow
            batches.append(RefusalBatch(None, o.count, o.first, o.last, tuple(o.targets), None))
        self._pending = {}
        self._overflow = _Pending()
        self._opened = {k: t for k, t in self._opened.items() if now - t < WINDOW_SECONDS}
        return batches


class RefusalAudit:
    """The tally and its writer: the immediate records and the periodic flush."""

    def __init__(
        self, audit: AuditLog, registry: CollectorRegistry, clock: Callable[[], float]
    ) -> None:
        self._audit = audit
        self._clock = clock
        self.tally = RefusalTally(registry)

    async def refused(
        self,
        key: RefusalKey,
        *,
        method: str,
        status: int,
        target: str | None,
        client_ip: str | None,
    ) -> None:
        if not self.tally.note(key, target=target, client_ip=client_ip, now=self._clock()):
            return
        await self._audit.record(
            "admin.refused",
            actor=key.actor,
            client_ip=client_ip,
            outcome=key.reason,
            target=key.route,
            method=method,
            status=status,
            count=1,
            target_user=target,
        )

    async def flush(self) -> int:
        """Write what was counted since the last flush; the refusals it covered."""
        written = 0
        for batch in self.tally.take(self._clock()):
            key = batch.key
            await self._audit.record(
                "admin.refused",
                actor=key.actor if key else None,
                client_ip=batch.client_ip,
                outcome=key.reason if key else "overflow",
                target=key.route if key else None,
                count=batch.count,
                first=_when(batch.first),
                last=_when(batch.last),
                target_users=list(batch.targets),
            )
            written += batch.count
        return written

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception:
                log.exception("admin refusals not written to the audit trail")

    def lifecycle(self) -> Callable[[web.Application], AsyncIterator[None]]:
        async def context(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.get_running_loop().create_task(self._run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_FLUSH_SECONDS):
                    await self.flush()

        return context
