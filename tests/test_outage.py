"""The store taken away under load: requests fail fast (503), connection attempts are bounded
by the circuit breaker, the log gets a summary per interval instead of a line per request, the
metrics say so, and everything recovers by itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy.engine import make_url

from sidecar.app import METRICS, build_app
from sidecar.refused_summary import RefusedSummary
from sidecar.store.sql import SqlStore
from tests.conftest import make_config
from tests.mfa.attack import BASE, Client, console_app
from tests.store.support import create_schema, drop_schema, postgres_url

pytestmark = pytest.mark.postgres


class CuttableLink:
    """A TCP hop to the real database that the test can cut: while cut, every connection is
    accepted and closed at once (a database that went away), and counted."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.cut = False
        self.attempts_while_cut = 0
        self.attempt_times: list[float] = []
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            self.attempts_while_cut += 1
            self.attempt_times.append(asyncio.get_running_loop().time())
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self._target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.cut:
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


@pytest.fixture
async def deployment(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Client, CuttableLink]]:
    monkeypatch.setattr("sidecar.refused_summary.INTERVAL", 1.0)
    real = make_url(postgres_url())
    link = CuttableLink(real.host or "127.0.0.1", real.port or 5432)
    port = await link.start()
    url = real.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    schema = await create_schema(postgres_url())
    users: dict[str, dict[str, Any]] = {
        f"user-{n}": {"id": f"u-{n}", "role": "member"} for n in range(2000)
    }
    users["carol"] = {"id": "u-carol", "role": "member"}
    console = await aiohttp_server(console_app(users))
    config = make_config(
        tmp_path,
        f"http://127.0.0.1:{console.port}",
        **{**BASE, "security": {"mfa_policy": "all", "grace_period": "72h"}},
    )
    store = SqlStore(url, config.storage.encryption_key, schema=schema, connect_timeout=1.0)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(drop_schema, postgres_url(), schema)
        stack.push_async_callback(link.close)
        server = TestServer(build_app(config, store=store))
        await server.start_server()
        stack.push_async_callback(server.close)
        client = await aiohttp_client(server)
        client.session.cookie_jar.update_cookies({"console": "carol"})
        yield client, link


def sample(client: Client, name: str, **labels: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_store_outage_fails_fast_with_bounded_attempts_and_summarised_logs(
    deployment: tuple[Client, CuttableLink],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, link = deployment
    json = {"Accept": "application/json", "X-Forwarded-For": "198.51.100.7"}
    assert (await client.get("/reports", headers=json)).status == 200  # grace: allowed
    assert sample(client, "sidecar_store_up") == 1
    link.cut = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    statuses: list[int] = []
    users = iter(range(1999))
    with caplog.at_level(logging.WARNING):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as load:
            while loop.time() - started < 3.0:
                # A distinct user each time: the gate's MFA-state cache cannot answer.
                answers = await asyncio.gather(
                    *(
                        load.get(
                            client.make_url("/reports"),
                            headers={**json, "Cookie": f"console=user-{next(users)}"},
                        )
                        for _ in range(20)
                    )
                )
                statuses += [a.status for a in answers]
                await asyncio.sleep(0.05)
    elapsed = loop.time() - started
    assert set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(503) > 0
    # Without the breaker every refused request tried to connect (hundreds). With it: the
    # transactions already under way when the database went (at most the pool's size, 15,
    # each perhaps retried once by the pool's pre-ping), then one probe per backoff (0.5 s,
    # doubling).
    times = [t - started for t in link.attempt_times]
    burst = [t for t in times if t < 0.3]
    assert len(burst) <= 2 * 15, times
    assert len(times) - len(burst) <= 1 + elapsed, times
    assert sample(client, "sidecar_store_up") == 0
    assert sample(client, "sidecar_store_errors_total", operation="mfa", kind="circuit_open") > 0
    lines = [r.getMessage() for r in caplog.records]
    refusing = [m for m in lines if m.startswith("refusing requests") or "requests refused" in m]
    # The store's own state changes are one line each, not one per request either.
    assert lines.count("store unreachable: requests that need it are refused until it answers") == 1
    # Hundreds of refusals: a first line as the outage starts, then one summary per interval
    # (1 s here), never a line per request.
    assert refusing[0] == "refusing requests: store unavailable"
    assert 1 <= len(refusing) - 1 <= 1 + elapsed, refusing
    assert all("requests refused in the last 1 s: store unavailable" in r for r in refusing[1:])

    link.cut = False
    deadline = loop.time() + 40
    fresh = {**json, "Cookie": "console=user-1999"}  # never seen: needs the store
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as later:
        while (await later.get(client.make_url("/reports"), headers=fresh)).status != 200:
            assert loop.time() < deadline, "did not recover"
            await asyncio.sleep(0.2)
    assert sample(client, "sidecar_store_up") == 1
    assert "store reachable again" in [r.getMessage() for r in caplog.records]


def test_the_summary_counts_every_refusal_and_logs_one_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    summary = RefusedSummary()
    with caplog.at_level(logging.WARNING):
        for _ in range(927):
            summary.note("store unavailable", "database unavailable (ConnectionRefusedError)")
        summary.flush()
        for _ in range(3):
            summary.note("store unavailable")  # the outage goes on: no new "starts" line
        summary.flush()
        summary.flush()  # a quiet interval: nothing
        summary.note("store unavailable")  # a new outage starts
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refusing requests: store unavailable",
        "927 requests refused in the last 10 s: store unavailable",
        "3 requests refused in the last 10 s: store unavailable",
        "refusing requests: store unavailable",
    ]
