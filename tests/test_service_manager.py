"""What systemd sees (``Type=notify``): readiness notifications, and signals during start-up.

The test plays the service manager: it binds the datagram socket ``NOTIFY_SOCKET`` names,
starts ``sidecar run`` and signals it before it reported ready. A SIGHUP then must neither
kill it nor be lost (the reload is in effect from the first request after READY); a SIGTERM
must end it with status 0. Later reloads are announced (RELOADING, then READY once the new
config answers), and so is the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.notify_socket import service_manager
from tests.process import spawn, stop, wait_until_catching, write_config


def upload_app() -> web.Application:
    app = web.Application()

    async def anything(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="upstream")

    app.router.add_route("*", "/{tail:.*}", anything)
    return app


BODY = b"x" * 2048  # over 1KiB, under the default 64MiB


async def upload_statuses(port: int, count: int) -> list[int]:
    """POST ``BODY`` ``count`` times, each on a new connection (spread over workers)."""
    statuses = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count):
            async with session.post(f"http://127.0.0.1:{port}/upload", data=BODY) as response:
                statuses.append(response.status)
    return statuses


def set_max_body(config: Path, size: str) -> None:
    raw = yaml.safe_load(config.read_text())
    raw["listen"]["max_body_size"] = size
    config.write_text(yaml.safe_dump(raw))


def reload_records(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["action"] == "config.reload"]


async def wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    """Poll (30 s at most) until ``check()`` while the process runs."""
    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(check):
        assert proc.poll() is None, f"sidecar exited with {proc.returncode}"
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.002)


def as_named_pipe(path: Path) -> str:
    """Replace the file at ``path`` by a named pipe; its former content."""
    content = path.read_text()
    path.unlink()
    os.mkfifo(path)
    return content


def feed(path: Path, content: str, proc: subprocess.Popen[bytes]) -> None:
    """Write ``content`` into the pipe at ``path`` once the process opens it for reading,
    then put a regular file with it in the pipe's place (for reloads): the process reads
    this content from the pipe it opened, whatever the path holds from then on. The moment
    it read its config is known, not guessed."""
    deadline = time.monotonic() + 30
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader opened it
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            assert proc.poll() is None, f"sidecar exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the config was not read in time"
            time.sleep(0.002)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "w") as pipe:
        pipe.write(content)  # blocks until read when larger than the pipe's buffer
    regular = path.with_suffix(".new")
    regular.write_text(content)
    os.replace(regular, path)


@contextmanager
def held_write_lock(database: Path) -> Iterator[Callable[[], None]]:
    """SQLite's write lock on ``database`` (created empty), held until the callable given
    is called: a migration started meanwhile waits for it."""
    connection = sqlite3.connect(database, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            connection.execute("ROLLBACK")
            connection.close()

    try:
        yield release
    finally:
        release()


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    folder = Path(f"/proc/{pid}/fd")
    try:
        links = list(folder.iterdir())
    except FileNotFoundError:
        return False
    for link in links:
        with contextlib.suppress(OSError):
            if os.readlink(link) == str(path):
                return True
    return False


@pytest.fixture
async def upstream_url(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    server = await aiohttp_server(upload_app())
    return f"http://127.0.0.1:{server.port}"


def worker_pids(supervisor: int) -> set[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    return {int(pid) for pid in children.split()}


def running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers"])
async def test_sighup_before_ready_is_applied_before_ready_and_reloads_are_announced(
    tmp_path: Path, upstream_url: str, workers: int
) -> None:
    config, port, _ = write_config(
        tmp_path, upstream_url, workers=workers, logging={"level": "info"}
    )
    with service_manager() as manager:
        content = as_named_pipe(config)
        proc = spawn(tmp_path, config, env={"NOTIFY_SOCKET": manager.address})
        try:
            # Once it has read the file (through the pipe), the file changes, then SIGHUP:
            # the sidecar still has its imports, the store and the port ahead of it.
            await asyncio.to_thread(feed, config, content, proc)
            set_max_body(config, "1KiB")
            proc.send_signal(signal.SIGHUP)
            assert manager.pending() == [], "ready before the signal: the test proves nothing"

            ready = await manager.next(proc)
            assert ready["READY"] == "1"
            if workers > 1:
                assert ready["MAINPID"] == str(proc.pid)  # the supervisor, not a worker
                assert len(worker_pids(proc.pid)) == workers
            # In effect from the first request on, in every process on the port.
            assert await upload_statuses(port, 20 * workers) == [413] * 20 * workers
            records = reload_records(tmp_path)
            # Each process reloaded once, for the signal (not for a changed file).
            assert len({r["details"]["pid"] for r in records}) == len(records) == workers
            assert all(r["details"]["trigger"].startswith("SIGHUP") for r in records)

            # A reload once serving: RELOADING, then READY when the new value answers.
            set_max_body(config, "4KiB")
            proc.send_signal(signal.SIGHUP)
            reloading = await manager.next(proc)
            assert reloading["RELOADING"] == "1"
            assert int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
            assert (await manager.next(proc))["READY"] == "1"
            assert await upload_statuses(port, 20 * workers) == [200] * 20 * workers

            proc.send_signal(signal.SIGTERM)
            assert (await manager.next(proc))["STOPPING"] == "1"
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            stop(proc)
    assert "Traceback" not in (tmp_path / "sidecar.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers"])
async def test_a_file_changed_during_start_up_is_applied_without_a_signal(
    tmp_path: Path, upstream_url: str, workers: int
) -> None:
    config, port, _ = write_config(tmp_path, upstream_url, workers=workers)
    with service_manager() as manager:
        content = as_named_pipe(config)
        proc = spawn(tmp_path, config, env={"NOTIFY_SOCKET": manager.address})
        try:
            await asyncio.to_thread(feed, config, content, proc)
            set_max_body(config, "1KiB")  # while it starts; nobody sends SIGHUP
            assert (await manager.next(proc))["READY"] == "1"
            deadline = time.monotonic() + 20  # the file is looked at every 2 s

            while await upload_statuses(port, 20 * workers) != [413] * 20 * workers:
                assert time.monotonic() < deadline, "the changed file was never applied"
                await asyncio.sleep(0.2)
        finally:
            stop(proc)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers"])
async def test_sigterm_before_ready_exits_0_without_serving(
    tmp_path: Path, upstream_url: str, workers: int
) -> None:
    config, _, _ = write_config(tmp_path, upstream_url, workers=workers, logging={"level": "info"})
    with service_manager(abstract=True) as manager:
        proc = spawn(tmp_path, config, env={"NOTIFY_SOCKET": manager.address})
        try:
            await asyncio.to_thread(wait_until_catching, proc, signal.SIGTERM, signal.SIGHUP)
            proc.send_signal(signal.SIGHUP)  # not fatal either
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            stop(proc)
        notifications = manager.pending()
    assert {"READY": "1"} not in notifications
    assert all("READY" not in fields for fields in notifications)
    log = (tmp_path / "sidecar.log").read_text()
    assert "Traceback" not in log
    assert "sidecar started" not in log  # it never served


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "when"),
    [(1, "migrating"), (2, "migrating"), (2, "workers starting")],
    ids=["one-process-migrating", "supervisor-migrating", "workers-starting"],
)
async def test_sigterm_during_start_up_stops_what_started(
    tmp_path: Path, upstream_url: str, workers: int, when: str
) -> None:
    config, _, _ = write_config(tmp_path, upstream_url, workers=workers, logging={"level": "info"})
    database = tmp_path / "state.db"
    started: set[int] = set()
    with service_manager() as manager, held_write_lock(database) as release:
        proc = spawn(tmp_path, config, env={"NOTIFY_SOCKET": manager.address})
        try:
            if when == "migrating":
                # The store is open and its migration waits for the test's write lock: it
                # cannot be ready, whatever the machine's load.
                await wait_until(lambda: has_open(proc.pid, database), proc)
                proc.send_signal(signal.SIGTERM)
                release()
            else:
                release()
                await wait_until(lambda: bool(worker_pids(proc.pid)), proc)
                started = worker_pids(proc.pid)  # forked, importing: far from serving
                proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            stop(proc)
        notifications = manager.pending()
    assert all("READY" not in fields for fields in notifications)
    assert notifications[-1:] == [{"STOPPING": "1", "STATUS": "stopping"}]
    assert not [pid for pid in started if running(pid)]  # stopped and waited for
    log = (tmp_path / "sidecar.log").read_text()
    assert "Traceback" not in log
    if workers == 1:
        assert "stopped during start-up" in log  # after the store was set up: closed again


def test_a_refused_start_leaves_the_callers_signal_handlers_alone(tmp_path: Path) -> None:
    from sidecar.cli import EXIT_CONFIG, main

    path = tmp_path / "bad.yaml"
    path.write_text("workers: 0\n")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    assert main(["run", "--config", str(path)]) == EXIT_CONFIG
    assert {sig: signal.getsignal(sig) for sig in before} == before
