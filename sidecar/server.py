"""Running the sidecar: the public and admin listeners in one event loop, signals, readiness
notifications, draining."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar import __version__
from sidecar.app import DRAINING, IN_FLIGHT, LIVE, METRICS, PROXY, build_admin_app, build_app
from sidecar.config import Config
from sidecar.file_stamp import FileStamp
from sidecar.listener import (
    FD_HEADROOM,
    ConnectionGuard,
    GuardedAppRunner,
    raise_open_files_limit,
)
from sidecar.logs import fields
from sidecar.process_signals import LoopSignals, StartupSignals
from sidecar.reload import Reloader
from sidecar.sd_notify import Notifier

log = logging.getLogger("sidecar")


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    tls = config.listen.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


async def serve(
    config: Config,
    config_path: Path | None = None,
    *,
    with_admin: bool = True,
    read_at: FileStamp | None = None,
    early: StartupSignals | None = None,
    notifier: Notifier | None = None,
    started: Callable[[], None] | None = None,
    reloaded: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain: /readyz turns unready, the listeners stop
    accepting, in-flight requests and WebSockets get up to ``listen.drain_timeout`` to
    finish. SIGHUP (and a changed ``config_path``) reloads the configuration; ``read_at``
    is the file's stamp from before ``config`` was read (a change made since is applied).

    Signals are handled from the first step, and ``early`` holds those that arrived before
    (``StartupSignals``). A reload asked for before serving is applied once the app is set
    up, before the listener accepts; a stop asked for before serving ends the start-up at
    the next step and stops what had started.

    ``notifier`` (systemd) hears READY once the listeners accept, RELOADING and READY around
    each later reload, STOPPING when the drain begins. ``with_admin=False`` is for worker
    processes: their supervisor serves the admin port (and notifies). ``started`` is called
    once the public listener accepts connections, ``reloaded`` after each reload a SIGHUP
    asked for (applied or refused).
    """
    loop = asyncio.get_running_loop()
    signals = LoopSignals(loop, early)
    notify = notifier if notifier is not None else Notifier(None)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await _serve(
                    config,
                    config_path,
                    read_at,
                    with_admin,
                    signals,
                    notify,
                    stack,
                    started,
                    reloaded,
                )
            finally:
                notify.stopping()
        log.info("sidecar stopped")
    finally:
        signals.close()


async def _serve(
    config: Config,
    config_path: Path | None,
    read_at: FileStamp | None,
    with_admin: bool,
    signals: LoopSignals,
    notify: Notifier,
    stack: contextlib.AsyncExitStack,
    started: Callable[[], None] | None,
    reloaded: Callable[[], None] | None,
) -> None:
    """Start, each step's undoing pushed on ``stack``; serve until stopped."""
    if signals.stop.is_set():  # asked for before the loop ran
        log.info("stopped during start-up")
        return
    app = build_app(config)
    admin = build_admin_app(app)
    raise_open_files_limit(
        config.listen.max_connections
        + config.upstream.max_connections
        + config.upstream.max_websockets  # each relayed WebSocket holds its own upstream socket
        + FD_HEADROOM
    )
    runner = public_runner(app)
    admin_runner = web.AppRunner(admin, access_log=None, handle_signals=False)
    await runner.setup()  # the store (migrations), the live settings, the upstream pool
    stack.push_async_callback(runner.cleanup)
    await admin_runner.setup()
    stack.push_async_callback(admin_runner.cleanup)
    if signals.stop.is_set():
        log.info("stopped during start-up")
        return
    reloader = Reloader(app, config_path, read_at=read_at) if config_path is not None else None

    async def reload_owed() -> None:
        # Before the listener accepts (the first request gets the new config) and again
        # before READY (for one that came meanwhile): once READY is sent, it is in effect.
        while reloader is not None and signals.take_owed_reload():
            await reloader.reload("SIGHUP during start-up")
            if reloaded is not None:
                reloaded()

    await reload_owed()
    site = web.TCPSite(
        runner,
        config.listen.host,
        config.listen.port,
        ssl_context=_ssl_context(config),
        reuse_port=config.workers > 1 or None,
        backlog=1024,
    )
    await site.start()
    stack.push_async_callback(_drain, app, site, config.listen.drain_timeout)
    if with_admin:
        admin_site = web.TCPSite(admin_runner, config.admin.host, config.admin.port)
        await admin_site.start()
    # Everything built so far (config, caches, IP lists, imported modules) lives as long as
    # the process: out of the cyclic GC's reach, full collections stay short (measured:
    # 65-70 ms pauses per full collection without this, under load).
    gc.collect()
    gc.freeze()
    await reload_owed()
    if signals.stop.is_set():
        log.info("stopped during start-up")
        return
    if started is not None:
        started()
    listen = f"{config.listen.host}:{config.listen.port}"
    notify.ready(status=f"serving on {listen}")
    log.info(
        "sidecar started",
        extra=fields(
            version=__version__,
            listen=listen,
            admin=f"{config.admin.host}:{config.admin.port}",
            upstream=config.upstream.url,
        ),
    )
    reloads: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def reload_on_sighup(reloader: Reloader) -> None:
        await reloader.reload("SIGHUP")
        if reloaded is not None:
            reloaded()

    def on_sighup() -> None:
        if signals.stop.is_set():
            log.info("SIGHUP ignored: stopping")
        elif reloader is None:
            log.warning("SIGHUP ignored: no config file to reload")
        else:
            task = loop.create_task(reload_on_sighup(reloader))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    if reloader is not None:
        reloader.start(notify)
        stack.push_async_callback(reloader.stop)
    signals.serving(on_sighup)
    await signals.stop.wait()


def public_runner(app: web.Application) -> GuardedAppRunner:
    """The public listener's runner: connection caps and the head deadline (read from the
    live settings at each accept), and the server options the proxy depends on."""
    live = app[LIVE]
    guard = ConnectionGuard(
        limits=lambda: live.config.listen,
        exempt=lambda address: address in live.network.trusted_proxies,
        metrics=app[METRICS],
    )
    return GuardedAppRunner(
        app,
        guard=guard,
        access_log=None,
        handle_signals=False,
        # The drain itself is ours (see serve); this is only the last grace for handlers
        # still running after it.
        shutdown_timeout=1.0,
        # Request bodies are forwarded as sent: aiohttp would otherwise inflate a
        # Content-Encoding: gzip body and forward plaintext under the compressed length.
        auto_decompress=False,
        # aiohttp's own default (3630 s) lets a client hold an idle connection for an hour.
        keepalive_timeout=live.config.listen.keepalive_timeout,
    )


async def _drain(app: web.Application, site: web.BaseSite, timeout: float) -> None:
    """Graceful shutdown: /readyz unready, stop accepting, let in-flight requests and
    WebSockets finish for up to ``timeout`` while their connections keep working (aiohttp's
    own shutdown would discard incoming data at once, stalling uploads), then close the
    WebSockets still open with 1001."""
    log.info("draining", extra=fields(timeout_s=timeout))
    app[DRAINING].set()
    await site.stop()
    in_flight = app[IN_FLIGHT]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(in_flight.idle.wait(), timeout)
    if in_flight.count > 0:
        log.warning(
            "drain timeout reached, closing what is left",
            extra=fields(in_flight=in_flight.count),
        )
    await app[PROXY].close_websockets()


def run_until_stopped(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop  # optional speed-up
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
