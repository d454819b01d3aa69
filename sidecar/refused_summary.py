"""Requests refused because a dependency is down, summarised in the log instead of one warning
line per request (an outage must not become a log storm).

``note(reason)`` counts, in memory, on the request path; a background task writes one line per
reason every ``INTERVAL`` seconds ("927 requests refused in the last 10 s: store
unavailable"), and once more at shutdown. The first refusal after a quiet interval is also
logged at once (once per outage, not per interval), so an outage shows in the log as it
starts. Metrics count every refusal by
themselves (``sidecar_requests_total{decision}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from sidecar.logs import fields

log = logging.getLogger("sidecar")

INTERVAL = 10.0


class RefusedSummary:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._details: dict[str, str] = {}
        self._last_interval: set[str] = set()

    def note(self, reason: str, detail: str = "") -> None:
        """Count one refused request (``reason``: e.g. ``store unavailable``)."""
        starts = reason not in self._counts and reason not in self._last_interval
        self._counts[reason] = self._counts.get(reason, 0) + 1
        if detail:
            self._details[reason] = detail
        if starts:
            log.warning("refusing requests: %s", reason, extra=fields(reason=reason, detail=detail))

    def flush(self) -> None:
        counts, details = self._counts, self._details
        self._counts, self._details = {}, {}
        self._last_interval = set(counts)
        for reason, count in counts.items():
            log.warning(
                "%d requests refused in the last %g s: %s",
                count,
                INTERVAL,
                reason,
                extra=fields(refused=count, reason=reason, detail=details.get(reason, "")),
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            self.flush()

    def lifecycle(self) -> Callable[[web.Application], AsyncIterator[None]]:
        async def context(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.get_running_loop().create_task(self._run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.flush()

        return context
