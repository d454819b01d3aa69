"""The circuit breaker in front of the store and the console: fail fast while down, one
probe per backoff, recovery noticed."""

from __future__ import annotations

from sidecar.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # read afresh (a property that moves with the clock)


def test_a_failure_opens_it_and_only_one_probe_goes_per_backoff() -> None:
    clock = Clock()
    changes: list[bool] = []
    breaker = CircuitBreaker("x", base=1.0, maximum=8.0, clock=clock, on_change=changes.append)
    assert all(breaker.allow() for _ in range(5))  # closed: everyone goes
    breaker.failure()
    assert changes == [False]
    assert not breaker.allow()
    assert state_of(breaker) is BreakerState.OPEN
    clock.now += 1.0
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not any(breaker.allow() for _ in range(50))  # everyone else fails fast
    breaker.failure()  # the probe failed: twice the backoff
    clock.now += 1.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()
    breaker.failure()
    for _ in range(10):  # doubling stops at the maximum
        clock.now += 8.0
        assert breaker.allow()
        breaker.failure()
    assert breaker.retry_in() == 8.0
    clock.now += 8.0
    assert breaker.allow()
    breaker.success()
    assert changes == [False, True]
    assert breaker.up
    assert breaker.allow()
    assert breaker.retry_in() == 0.0
    breaker.failure()  # a new outage starts from the base backoff again
    assert breaker.retry_in() == 1.0


def test_a_probe_that_ends_without_an_outcome_lets_another_go() -> None:
    clock = Clock()
    breaker = CircuitBreaker("x", base=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release()  # the probe was cancelled
    assert breaker.allow()
