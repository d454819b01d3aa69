"""The listener's socket tests run on asyncio's event loop and on uvloop (which ``sidecar run``
uses when installed): the guard hooks into the protocol callbacks both loops drive."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, LoopFactory]:
    """Tests marked ``both_loops`` run on both loops; the others (which start a sidecar
    process, whatever loop the test itself uses) on asyncio's."""
    factories: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    if item.get_closest_marker("both_loops") is None:
        return factories
    try:
        import uvloop
    except ImportError:  # the socket tests still run on asyncio
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
