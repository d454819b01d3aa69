"""Fixtures for the identity tests: the stub console on a real port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pytest_aiohttp import AiohttpServer

from tests.identity.stub_console import StubConsole, build_console


@pytest.fixture
async def console(
    aiohttp_server: AiohttpServer,
) -> AsyncIterator[StubConsole]:
    state = StubConsole()
    server = await aiohttp_server(build_console(state))
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    # Let parked handlers finish so the server shuts down at once.
    state.release.set()
    state.gate.set()
