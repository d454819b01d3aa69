"""Requests the IP gate refused, in the audit trail: aggregated per /24 or /64, written off the
request path in bounded batches.

Writing a chained audit record per blocked address made the IP gate a store-write amplifier
for anyone with many addresses. Promises:

- **Nothing on the request path but a count**: :meth:`BlockedAudit.count` is O(1) in memory
  and never awaits; a store that is slow, down or failing cannot slow or fail a blocked
  request. Metrics count every block by themselves (``sidecar_requests_total{decision}``).
- **Bounded memory**: per interval, at most ``max_prefixes`` (prefix, decision) tallies, each
  with at most ``SAMPLES`` sample addresses and matching rules; blocks from further
  prefixes go into one overflow bucket (counted, never dropped).
- **Bounded writes**: every ``interval`` (10 s) a background task writes at most
  ``max_records`` (50) ``ip.blocked`` records, the prefixes with the most blocks, plus one
  overflow summary for the rest; so at most 51 records per interval per process, whatever
  the traffic. The counts of one flush add up to every block counted in its interval. A
  final flush runs on shutdown.
- **Records**: ``client_ip`` is the prefix (``192.0.2.0/24``, ``2001:db8::/64``; IPv4-mapped
  IPv6 clients count as IPv4), ``outcome`` the decision (``denied_ip``, ``not_allowlisted``),
  details ``count``, ``first`` and ``last`` (UTC), ``sample`` (up to 5 addresses),
  ``rules`` (up to 5 matching denylist rules) and ``list``. The overflow summary has no
  ``client_ip``, outcome ``overflow``, and details ``count``, ``prefixes_at_least``,
  ``decisions`` (count per decision), ``first``, ``last``, ``sample``.

Addresses and rules are the sidecar's own parsed values, never raw request text. With
``workers: N`` each process keeps its own tally and writes its own records.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from sidecar.audit import AuditLog
from sidecar.decision import Decision
from sidecar.net import IpAddress

log = logging.getLogger("sidecar.audit")

FLUSH_SECONDS = 10.0
MAX_PREFIXES = 1000
MAX_RECORDS = 50
SAMPLES = 5
#: How long the final flush at shutdown may wait for the store.
FINAL_FLUSH_SECONDS = 5.0

# A prefix as (IP version, the address's integer with the host bits shifted out).
_Key = tuple[int, int, Decision]
_V4_HOST_BITS = 32 - 24
_V6_HOST_BITS = 128 - 64


def _add_sample(values: list[str], value: str) -> None:
    if len(values) < SAMPLES and value not in values:
        values.append(value)


@dataclass(slots=True)
class _Tally:
    count: int
    first: float
    last: float
    list_name: str | None
    sample: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Overflow:
    count: int = 0
    prefixes: int = 0  # tallied prefixes folded in at flush time
    untallied: int = 0  # blocks from prefixes beyond the tally's capacity
    first: float = math.inf
    last: float = -math.inf
    decisions: dict[str, int] = field(default_factory=dict)
    sample: list[str] = field(default_factory=list)

    def add(self, count: int, first: float, last: float, decision: Decision) -> None:
        self.count += count
        self.first = min(self.first, first)
        self.last = max(self.last, last)
        self.decisions[decision.value] = self.decisions.get(decision.value, 0) + count


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """One ``ip.blocked`` record to write: arguments for :meth:`AuditLog.record`."""

    client_ip: str | None
    outcome: str
    details: dict[str, Any]


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def prefix_of(version: int, bits: int) -> str:
    """The /24 or /64 a tally key names, as a CIDR string."""
    if version == 4:
        return str(ipaddress.IPv4Network((bits << _V4_HOST_BITS, 24)))
    return str(ipaddress.IPv6Network((bits << _V6_HOST_BITS, 64)))


class BlockedTally:
    """Counts blocks per prefix and decision for one interval; no I/O, no clock."""

    def __init__(self, *, max_prefixes: int = MAX_PREFIXES, max_records: int = MAX_RECORDS):
        self._max_prefixes = max_prefixes
        self._max_records = max_records
        self._tallies: dict[_Key, _Tally] = {}
        self._overflow = _Overflow()

    def count(
        self,
        address: IpAddress,
        decision: Decision,
        *,
        rule: str | None,
        list_name: str | None,
        now: float,
    ) -> None:
        """Count one blocked request from ``address`` at ``now`` (epoch seconds)."""
        version = address.version
        host_bits = _V4_HOST_BITS if version == 4 else _V6_HOST_BITS
        key = (version, int(address) >> host_bits, decision)
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= self._max_prefixes:
                overflow = self._overflow
                overflow.untallied += 1
                overflow.add(1, now, now, decision)
                _add_sample(overflow.sample, str(address))
                return
            tally = self._tallies[key] = _Tally(0, now, now, list_name)
        tally.count += 1
        tally.last = now
        if len(tally.sample) < SAMPLES:
            _add_sample(tally.sample, str(address))
        if rule is not None and len(tally.rules) < SAMPLES:
            _add_sample(tally.rules, rule)

    def take(self) -> list[BlockRecord]:
        """The records for everything counted so far (at most ``max_records`` + 1), and a
        fresh start."""
        tallies, overflow = self._tallies, self._overflow
        self._tallies, self._overflow = {}, _Overflow()
        order = list(tallies.items())  # first seen first: ties keep that order
        top = heapq.nlargest(self._max_records, order, key=lambda item: item[1].count)
        kept = {key for key, _ in top}
        records = [
            BlockRecord(
                client_ip=prefix_of(version, bits),
                outcome=decision.value,
                details={
                    "count": tally.count,
                    "first": _when(tally.first),
                    "last": _when(tally.last),
                    "sample": tally.sample,
                    "rules": tally.rules,
                    "list": tally.list_name,
                },
            )
            for (version, bits, decision), tally in top
        ]
        for key, tally in order:
            if key not in kept:
                overflow.prefixes += 1
                overflow.add(tally.count, tally.first, tally.last, key[2])
                for address in tally.sample:
                    _add_sample(overflow.sample, address)
        if overflow.count:
            records.append(
                BlockRecord(
                    client_ip=None,
                    outcome="overflow",
                    details={
                        "count": overflow.count,
                        "prefixes_at_least": overflow.prefixes + (1 if overflow.untallied else 0),
                        "decisions": overflow.decisions,
                        "first": _when(overflow.first),
                        "last": _when(overflow.last),
                        "sample": overflow.sample,
                    },
                )
            )
        return records


class BlockedAudit:
    """The tally the IP gate counts into, and the writer that empties it into the audit
    trail every ``interval`` seconds."""

    def __init__(
        self,
        audit: AuditLog,
        *,
        interval: float = FLUSH_SECONDS,
        tally: BlockedTally | None = None,
    ) -> None:
        self._audit = audit
        #: Seconds between writes; read before each wait.
        self.interval = interval
        self._tally = tally or BlockedTally()

    def count(
        self,
        address: IpAddress,
        decision: Decision,
        *,
        rule: str | None,
        list_name: str | None,
        now: float,
    ) -> None:
        """Count one block (the IP gate's only call: in memory, never awaits)."""
        self._tally.count(address, decision, rule=rule, list_name=list_name, now=now)

    async def flush(self) -> int:
        """Write what was counted since the last flush; returns the number of records."""
        records = self._tally.take()
        for record in records:
            try:
                await self._audit.record(
                    "ip.blocked",
                    actor=None,
                    client_ip=record.client_ip,
                    outcome=record.outcome,
                    **record.details,
                )
            except Exception:
                # AuditLog already keeps what it can when the store is down; whatever else
                # failed, the next interval's records must still be written.
                log.exception("ip.blocked record not written")
        return len(records)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    def lifecycle(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """A ``cleanup_ctx`` entry: writes every ``interval`` while the app runs, and once
        more at shutdown (bounded by ``FINAL_FLUSH_SECONDS``)."""

        async def context(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.get_running_loop().create_task(self.run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                await asyncio.wait_for(self.flush(), FINAL_FLUSH_SECONDS)
            except TimeoutError:
                log.error("ip.blocked records not written at shutdown: the store did not answer")

        return context
