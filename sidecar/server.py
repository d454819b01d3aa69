"""Running the sidecar: the public and admin listeners in one event loop, signals, draining."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar import __version__
from sidecar.app import DRAINING, IN_FLIGHT, LIVE, METRICS, PROXY, build_admin_app, build_app
from sidecar.config import Config
from sidecar.identity.warnings import token_warnings
from sidecar.listener import (
    FD_HEADROOM,
    ConnectionGuard,
    GuardedAppRunner,
    raise_open_files_limit,
)
from sidecar.logs import fields
from sidecar.reload import Reloader

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
    started: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain: /readyz turns unready, the listeners stop
    accepting, in-flight requests and WebSockets get up to ``listen.drain_timeout`` to
    finish. SIGHUP (and a changed ``config_path``) reloads the configuration.

    ``with_admin=False`` is for worker processes: their supervisor serves the admin port;
    ``started`` is called once the public listener accepts connections.
    """
    app = build_app(config)
    for warning in token_warnings(config):
        log.warning("insecure setting: %s", warning)
    admin = build_admin_app(app)
    raise_open_files_limit(
        config.listen.max_connections + config.upstream.max_connections + FD_HEADROOM
    )
    runner = public_runner(app)
    admin_runner = web.AppRunner(admin, access_log=None, handle_signals=False)
    await runner.setup()
    await admin_runner.setup()
    site = web.TCPSite(
        runner,
        config.listen.host,
        config.listen.port,
        ssl_context=_ssl_context(config),
        reuse_port=config.workers > 1 or None,
        backlog=1024,
    )
    await site.start()
    if with_admin:
        admin_site = web.TCPSite(admin_runner, config.admin.host, config.admin.port)
        await admin_site.start()
    # Everything built so far (config, caches, IP lists, imported modules) lives as long as
    # the process: out of the cyclic GC's reach, full collections stay short (measured:
    # 65-70 ms pauses per full collection without this, under load).
    gc.collect()
    gc.freeze()
    if started is not None:
        started()
    log.info(
        "sidecar started",
        extra=fields(
            version=__version__,
            listen=f"{config.listen.host}:{config.listen.port}",
            admin=f"{config.admin.host}:{config.admin.port}",
            upstream=config.upstream.url,
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = Reloader(app, config_path) if config_path is not None else None
    reloads: set[asyncio.Task[bool]] = set()
    if reloader is not None:
        reloader.start()

        def on_sighup() -> None:
            task = loop.create_task(reloader.reload("SIGHUP"))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        if reloader is not None:
            await reloader.stop()
        await _drain(app, site, config.listen.drain_timeout)
        await runner.cleanup()
        await admin_runner.cleanup()
        log.info("sidecar stopped")


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
