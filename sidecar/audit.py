"""The audit trail: one JSON object per security-relevant event.

Records go to ``audit.file`` (``-`` = stdout) as JSON lines. (The hash chain, the copy in the
store and the audit page come with the Security page work.) Never put secrets, codes, cookies
or full credential ids in a record.
"""

from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter


class AuditLog:
    """Appends audit records; each write is flushed so a crash loses nothing written."""

    def __init__(self, file: str, registry: CollectorRegistry) -> None:
        self._path = file
        self._stream: IO[str] | None = None
        self.events_total = Counter(
            "sidecar_audit_events_total",
            "Audit records written, by action",
            ["action"],
            registry=registry,
        )

    def _out(self) -> IO[str]:
        if self._stream is None:
            self._stream = (
                sys.stdout if self._path == "-" else open(self._path, "a", encoding="utf-8")  # noqa: SIM115
            )
        return self._stream

    def record(
        self,
        action: str,
        *,
        actor: str | None,
        client_ip: str | None,
        outcome: str = "success",
        target: str | None = None,
        **details: Any,
    ) -> None:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "action": action,
            "actor": actor,
            "client_ip": client_ip,
            "target": target,
            "outcome": outcome,
        }
        if details:
            entry["details"] = details
        out = self._out()
        out.write(json.dumps(entry, default=str, separators=(",", ":")) + "\n")
        out.flush()
        self.events_total.labels(action).inc()

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()
        self._stream = None


class OncePerWindow:
    """Remembers keys seen in the last ``window`` seconds, bounded to ``max_keys`` entries.

    Used to write at most one ``ip.blocked`` record per client address per minute while a
    flood of blocked requests is counted in full by the metrics. When more than ``max_keys``
    addresses are blocked within one window the oldest are forgotten, so memory stays bounded
    and a flood of distinct addresses writes more records rather than fewer.
    """

    def __init__(self, window: float, max_keys: int = 10_000) -> None:
        self._window = window
        self._max = max_keys
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_in_window(self, key: str, now: float) -> bool:
        last = self._seen.get(key)
        if last is not None and now - last < self._window:
            return False
        self._seen[key] = now
        self._seen.move_to_end(key)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return True
