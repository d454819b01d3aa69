"""``workers: N``: N processes serving the public port together (SO_REUSEPORT), supervised.

The supervisor (this process) prepares the store once (migrations, settings seed), forks the
workers, restarts one that dies, and serves the admin port itself: ``/metrics`` aggregates
every worker through prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set
before prometheus-client is imported); ``/healthz`` is healthy while every worker runs;
``/readyz`` also needs the store and the upstream. SIGHUP is passed on to the workers (each
reloads), SIGTERM too (each drains), and the supervisor exits when they have.

Every process on the port runs one configuration: a worker started later (a replacement after
a crash) gets what its siblings run after their reloads, ``running_config(start-up config,
file now)``: the restart-only keys as the supervisor started, the rest as the file says; the
last good one while the file is invalid (the supervisor follows the file as the workers do:
on SIGHUP and when it changes).

The supervisor is the service's main process for systemd: READY (with MAINPID) once every
worker serves, RELOADING and READY around a reload (READY once every worker has reloaded),
STOPPING when it begins to drain. Workers never notify.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from sidecar.config import Config, ConfigError, load_config
from sidecar.file_stamp import FileStamp, file_stamp
from sidecar.logs import fields
from sidecar.process_signals import LoopSignals, StartupSignals
from sidecar.sd_notify import Notifier

log = logging.getLogger("sidecar.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How often the supervisor looks at its workers (a dead one is restarted) and at the file.
TICK_SECONDS = 0.2
#: A worker that dies is restarted, at most once in this long (a crash loop stays slow).
RESTART_INTERVAL_SECONDS = 1.0
#: How long a reload waits for every worker's before reporting the service ready again.
RELOAD_WAIT_SECONDS = 60.0
_CONTROL_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def prepare_metrics_dir() -> Path:
    """A fresh directory for the workers' metric files; call before importing
    prometheus-client (``sidecar.metrics``) anywhere in this process."""
    folder = Path(tempfile.mkdtemp(prefix="sidecar-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


@dataclass
class _Worker:
    process: BaseProcess
    #: Set once the worker's public listener accepts connections.
    ready: EventType
    #: How many reloads asked for by SIGHUP the worker has finished (applied or refused).
    reloads: Synchronized[int]
    #: When it was started (monotonic): a dead worker waits RESTART_INTERVAL_SECONDS.
    spawned_at: float

    def alive(self) -> bool:
        return self.process.is_alive()

    def serving(self) -> bool:
        return self.process.is_alive() and self.ready.is_set()

    def reloads_done(self) -> int:
        return int(self.reloads.value)


def _worker_main(
    config: Config,
    config_path: Path | None,
    read_at: FileStamp,
    index: int,
    ready: EventType,
    reloads: Synchronized[int],
) -> None:
    # Forked with the control signals blocked (see _blocked_signals): they wait, pending,
    # until this process handles them itself. The parent's wakeup fd goes first, or a signal
    # sent to this worker would be read by the supervisor's event loop as its own.
    signal.set_wakeup_fd(-1)
    early = StartupSignals.install()
    # The supervisor handles Ctrl-C for the group; a worker drains on its SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _CONTROL_SIGNALS)
    from sidecar.server import run_until_stopped, serve

    def reloaded() -> None:
        with reloads.get_lock():
            reloads.value += 1

    log.info("worker %d starting (pid %d)", index, os.getpid())
    run_until_stopped(
        serve(
            config,
            config_path,
            read_at=read_at,
            with_admin=False,
            early=early,
            started=ready.set,
            reloaded=reloaded,
        )
    )


@contextlib.contextmanager
def _blocked_signals() -> Iterator[None]:
    """SIGHUP, SIGTERM and SIGINT held back in this thread (a forked child inherits the
    mask): a signal sent to a worker before it installed its handlers is delivered to them,
    neither lost nor run by a handler inherited from the supervisor."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _CONTROL_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class RunningConfigs:
    """The config a worker started now runs: ``sidecar.app.running_config(started, file)``,
    what its siblings run after their reloads; the last good one while the file is invalid.
    ``read_at`` is the file's stamp from before ``last_good`` was read: the worker's own
    watcher then applies whatever changed since, as its siblings' watchers did.
    """

    def __init__(self, started: Config, path: Path | None, read_at: FileStamp) -> None:
        self.started = started
        self.last_good = started
        self.read_at = read_at
        self._path = path

    def refresh(self) -> Config:
        """Read the file again (blocking: call it in a thread from the event loop)."""
        from sidecar.app import running_config

        if self._path is None:
            return self.last_good
        stamp = file_stamp(self._path)
        try:
            self.last_good = running_config(self.started, load_config(self._path))
            self.read_at = stamp
        except ConfigError as exc:
            log.error(
                "config file invalid; a worker started now runs the last good config",
                extra=fields(file=str(self._path), problems=exc.problems),
            )
        return self.last_good


async def _prepare_store(config: Config) -> None:
    from sidecar.settings import SettingsService
    from sidecar.store import open_store

    store = open_store(config.storage.url, config.storage.encryption_key)
    try:
        await store.migrate()
        await SettingsService(store, config, lambda _: None).load()
    finally:
        await store.close()


def run_workers(
    config: Config,
    config_path: Path | None,
    metrics_dir: Path,
    *,
    read_at: FileStamp = None,
    early: StartupSignals | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Supervise ``config.workers`` worker processes until SIGTERM/SIGINT; the exit status.

    ``early`` holds the signals caught before (a stop asked for before the workers were
    started starts none; a reload is passed on to them once they are)."""
    from sidecar.store.base import StoreUnavailable

    early = early if early is not None else StartupSignals()
    notify = notifier if notifier is not None else Notifier(None)
    if early.stop_requested:
        notify.stopping()
        return 0
    try:
        asyncio.run(_prepare_store(config))
    except StoreUnavailable as exc:
        # The workers retry by themselves and refuse requests until the store answers.
        log.error("store unavailable at start: %s", exc)
    if early.stop_requested:
        notify.stopping()
        return 0
    context = multiprocessing.get_context("fork")
    workers: dict[int, _Worker] = {}
    configs = RunningConfigs(config, config_path, read_at)

    def spawn(index: int) -> None:
        """Start worker ``index`` with the config its siblings run (``configs``)."""
        ready = context.Event()
        reloads = context.Value("Q", 0)
        process = context.Process(
            target=_worker_main,
            args=(configs.last_good, config_path, configs.read_at, index, ready, reloads),
            name=f"sidecar-worker-{index}",
        )
        with _blocked_signals():
            process.start()
        workers[index] = _Worker(process, ready, reloads, time.monotonic())

    for index in range(config.workers):
        spawn(index)
    try:
        asyncio.run(_supervise(config, config_path, workers, configs, spawn, early, notify))
    finally:
        for worker in workers.values():
            if worker.alive():
                worker.process.kill()
            worker.process.join(1)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


async def _supervise(
    config: Config,
    config_path: Path | None,
    workers: dict[int, _Worker],
    configs: RunningConfigs,
    spawn: Callable[[int], None],
    early: StartupSignals,
    notify: Notifier,
) -> None:
    from aiohttp import web
    from prometheus_client import CollectorRegistry, multiprocess
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    from sidecar.proxy import AiohttpUpstream
    from sidecar.store import open_store
    from sidecar.store.base import StoreUnavailable

    loop = asyncio.get_running_loop()
    signals = LoopSignals(loop, early)
    stop = signals.stop
    draining = False
    announced = False  # READY sent
    reload_lock = asyncio.Lock()
    refresh_lock = asyncio.Lock()
    reloads: set[asyncio.Task[None]] = set()

    def signal_workers(sig: signal.Signals, targets: list[_Worker]) -> None:
        for worker in targets:
            pid = worker.process.pid
            if pid is not None and worker.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    async def refresh() -> Config:
        async with refresh_lock:
            return await asyncio.to_thread(configs.refresh)

    async def reload_workers() -> None:
        """Each worker reloads; READY once all of them have (a worker still starting
        applies it before it serves)."""
        async with reload_lock:
            if announced:
                notify.reloading()
            await refresh()
            targets = [w for w in workers.values() if w.alive()]
            before = {id(w): w.reloads_done() for w in targets}
            signal_workers(signal.SIGHUP, targets)
            deadline = time.monotonic() + RELOAD_WAIT_SECONDS

            def pending() -> list[_Worker]:
                return [w for w in targets if w.alive() and w.reloads_done() == before[id(w)]]

            while pending():
                if stop.is_set() or time.monotonic() > deadline:
                    log.warning("%d worker(s) did not report their reload", len(pending()))
                    break
                await asyncio.sleep(0.05)
            if announced:
                notify.ready(status=f"{len(workers)} workers serving; config reloaded")

    def on_sighup() -> None:
        if draining or stop.is_set():
            log.info("SIGHUP ignored: stopping")
            return
        task = loop.create_task(reload_workers())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    upstream = AiohttpUpstream(config)
    store = open_store(config.storage.url, config.storage.encryption_key)
    probe: dict[str, float | bool | str] = {"at": 0.0, "ok": False, "reason": ""}

    def serving() -> int:
        return sum(1 for worker in workers.values() if worker.serving())

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
    try:
        await runner.setup()
        await web.TCPSite(runner, config.admin.host, config.admin.port).start()
        # SIGHUP from now on (and one that came during the start) goes to the workers.
        signals.serving(on_sighup)
        log.info("supervising %d workers", len(workers))
        stamp = configs.read_at
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)
            if stop.is_set():
                break
            for index, worker in list(workers.items()):
                since = time.monotonic() - worker.spawned_at
                if not worker.alive() and since >= RESTART_INTERVAL_SECONDS:
                    log.error(
                        "worker %d (pid %s) exited with %s; restarting",
                        index,
                        worker.process.pid,
                        worker.process.exitcode,
                    )
                    if worker.process.pid is not None:
                        multiprocess.mark_process_dead(worker.process.pid)  # type: ignore[no-untyped-call]
                    # It must run what the others run now (see RunningConfigs).
                    await refresh()
                    spawn(index)
            if config_path is not None and (now := file_stamp(config_path)) != stamp:
                # The workers reload a changed file by themselves; a worker started later
                # must get what they then run.
                stamp = now
                await refresh()
            if not announced and serving() == len(workers) and not reloads:
                announced = True
                notify.ready(status=f"{len(workers)} workers serving", mainpid=os.getpid())
                log.info("all %d workers serving", len(workers))
        draining = True
        notify.stopping()
        signal_workers(signal.SIGTERM, list(workers.values()))
        deadline = time.monotonic() + config.listen.drain_timeout + 5
        for worker in workers.values():
            await asyncio.to_thread(worker.process.join, max(0.0, deadline - time.monotonic()))
    finally:
        for task in reloads:
            task.cancel()
        await runner.cleanup()
        await upstream.close()
        await store.close()
        signals.close()
