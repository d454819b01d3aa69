"""``workers: N``: N processes serving the public port together (SO_REUSEPORT), supervised.

The supervisor (this process) prepares the store once (migrations, settings seed), forks the
workers, restarts one that dies, and serves the admin port itself: ``/metrics`` aggregates
every worker through prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set
before prometheus-client is imported); ``/healthz`` is healthy while every worker runs;
``/readyz`` also needs the store and the upstream. SIGHUP is passed on to the workers (each
reloads), SIGTERM too (each drains), and the supervisor exits when they have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from sidecar.config import Config, ConfigError, load_config

log = logging.getLogger("sidecar.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir() -> Path:
    """A fresh directory for the workers' metric files; call before importing
    prometheus-client (``sidecar.metrics``) anywhere in this process."""
    folder = Path(tempfile.mkdtemp(prefix="sidecar-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def _worker_main(config: Config, config_path: Path | None, index: int, ready: EventType) -> None:
    from sidecar.server import run_until_stopped, serve

    # The supervisor handles Ctrl-C for the group; a worker drains on SIGTERM only.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log.info("worker %d starting (pid %d)", index, os.getpid())
    run_until_stopped(serve(config, config_path, with_admin=False, started=ready.set))


async def _prepare_store(config: Config) -> None:
    from sidecar.settings import SettingsService
    from sidecar.store import open_store

    store = open_store(config.storage.url, config.storage.encryption_key)
    try:
        await store.migrate()
        await SettingsService(store, config, lambda _: None).load()
    finally:
        await store.close()


def run_workers(config: Config, config_path: Path | None, metrics_dir: Path) -> int:
    """Supervise ``config.workers`` worker processes until SIGTERM/SIGINT; the exit status."""
    from sidecar.store.base import StoreUnavailable

    try:
        asyncio.run(_prepare_store(config))
    except StoreUnavailable as exc:
        # The workers retry by themselves and refuse requests until the store answers.
        log.error("store unavailable at start: %s", exc)
    context = multiprocessing.get_context("fork")
    workers: dict[int, BaseProcess] = {}
    ready: dict[int, EventType] = {}

    latest = [config]

    def spawn(index: int) -> None:
        # A worker started later (a restart after a crash) must run what the others run
        # now: the file as last reloaded, not the config the supervisor started with.
        if config_path is not None:
            try:
                latest[0] = load_config(config_path)
            except ConfigError as exc:
                log.error("config file invalid, the new worker keeps the last good one: %s", exc)
        ready[index] = context.Event()
        process = context.Process(
            target=_worker_main,
            args=(latest[0], config_path, index, ready[index]),
            name=f"sidecar-worker-{index}",
        )
        process.start()
        workers[index] = process

    for index in range(config.workers):
        spawn(index)
    try:
        asyncio.run(_supervise(config, workers, ready, spawn))
    finally:
        for process in workers.values():
            if process.is_alive():
                process.kill()
            process.join(1)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


async def _supervise(
    config: Config,
    workers: dict[int, BaseProcess],
    ready: dict[int, EventType],
    spawn: Callable[[int], None],
) -> None:
    from aiohttp import web
    from prometheus_client import CollectorRegistry, multiprocess
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    from sidecar.proxy import AiohttpUpstream
    from sidecar.store import open_store
    from sidecar.store.base import StoreUnavailable

    stop = asyncio.Event()
    draining = False
    loop = asyncio.get_running_loop()

    def signal_workers(sig: signal.Signals) -> None:
        for process in workers.values():
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def on_term() -> None:
        nonlocal draining
        draining = True
        signal_workers(signal.SIGTERM)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, lambda: signal_workers(signal.SIGHUP))

    upstream = AiohttpUpstream(config)
    store = open_store(config.storage.url, config.storage.encryption_key)
    probe: dict[str, float | bool | str] = {"at": 0.0, "ok": False, "reason": ""}

    def serving() -> int:
        return sum(1 for i, p in workers.items() if p.is_alive() and ready[i].is_set())

    async def healthz(request: web.Request) -> web.Response:
        count = serving()
        if count < len(workers):
            return web.Response(status=503, text=f"{count}/{len(workers)} workers serving\n")
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        if serving() < len(workers):
            return web.json_response({"ready": False, "reason": "worker down"}, status=503)
        now = time.monotonic()
        if now - float(probe["at"]) >= 1.0:
            try:
                await store.ping()
                probe["ok"] = await upstream.probe()
                probe["reason"] = "upstream unreachable"
            except StoreUnavailable:
                probe["ok"] = False
                probe["reason"] = "store unavailable"
            probe["at"] = time.monotonic()
        if not probe["ok"]:
            return web.json_response({"ready": False, "reason": probe["reason"]}, status=503)
        return web.json_response({"ready": True, "workers": len(workers)})

    async def metrics(request: web.Request) -> web.Response:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    admin = web.Application()
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", metrics)
    runner = web.AppRunner(admin, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, config.admin.host, config.admin.port).start()
    log.info("supervising %d workers", len(workers))
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for index, process in list(workers.items()):
                if not process.is_alive() and not draining:
                    log.error(
                        "worker %d (pid %s) exited with %s; restarting",
                        index,
                        process.pid,
                        process.exitcode,
                    )
                    if process.pid is not None:
                        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                    spawn(index)
        deadline = time.monotonic() + config.listen.drain_timeout + 5
        for process in workers.values():
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
    finally:
        await runner.cleanup()
        await upstream.close()
        await store.close()
