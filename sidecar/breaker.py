"""A circuit breaker: while a dependency is down, fail fast instead of trying it per request.

Closed (healthy): every call goes through. The first failure opens it: calls fail fast, with
no connection attempt, for a backoff that doubles with each failed probe (``base`` up to
``maximum``). Then it is half-open: exactly one call (the probe) goes through while the
others keep failing fast; its success closes the breaker, its failure opens it again. So an
outage costs one connection attempt per backoff interval per process, not one per request,
and recovery is noticed within ``maximum`` seconds.

The breaker only decides; callers say what counts as a failure (a refused or timed-out
connection, not an answer they did not like). No I/O here; ``clock`` is passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        base: float = 0.5,
        maximum: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.name = name
        self._base = base
        self._maximum = maximum
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._backoff = base
        self._retry_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._retry_at:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def up(self) -> bool:
        """Whether the dependency answered the last time it was tried."""
        return self._state is BreakerState.CLOSED

    def retry_in(self) -> float:
        """Seconds until the next probe may go (0 when calls go through)."""
        return (
            max(0.0, self._retry_at - self._clock())
            if self._state is not BreakerState.CLOSED
            else 0.0
        )

    def allow(self) -> bool:
        """Whether this call may try the dependency; False means fail fast. A True in the
        half-open state makes this call the probe: report its outcome."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._clock() < self._retry_at or self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        was_up = self.up
        self._state = BreakerState.CLOSED
        self._backoff = self._base
        self._probing = False
        if not was_up and self._on_change is not None:
            self._on_change(True)

    def failure(self) -> None:
        was_up = self.up
        if self._state is BreakerState.OPEN and self._probing:
            self._backoff = min(self._backoff * 2, self._maximum)
        self._state = BreakerState.OPEN
        self._retry_at = self._clock() + self._backoff
        self._probing = False
        if was_up and self._on_change is not None:
            self._on_change(False)

    def release(self) -> None:
        """A call that was allowed ended without telling (cancelled): let another probe go."""
        self._probing = False
