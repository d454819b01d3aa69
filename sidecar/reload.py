"""Hot reload: SIGHUP or a changed config file re-reads the YAML.

A valid file is swapped in (``sidecar.app.apply_config``); settings that need a restart are
named in the log. An invalid file changes nothing: the running config stays, the problems
are logged with their YAML paths, and ``sidecar_config_reloads_total{result="failure"}``
counts it. Every attempt is audited (``config.reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from aiohttp import web

from sidecar.app import AUDIT, METRICS, apply_config
from sidecar.config import ConfigError, load_config
from sidecar.config_checks import config_warnings
from sidecar.file_stamp import FileStamp, file_stamp
from sidecar.logs import fields, log_config_warnings
from sidecar.sd_notify import Notifier
from sidecar.store.base import StoreUnavailable

log = logging.getLogger("sidecar.reload")

WATCH_SECONDS = 2.0


class Reloader:
    def __init__(
        self, app: web.Application, path: Path, *, read_at: FileStamp | None = None
    ) -> None:
        """``read_at``: the file's stamp from before the running config was read from it
        (default: now); a file that changed since is reloaded at the first look."""
        self._app = app
        self._path = path
        self._lock = asyncio.Lock()
        self._stamp = read_at if read_at is not None else file_stamp(path)
        self._task: asyncio.Task[None] | None = None
        self._notifier: Notifier | None = None

    async def reload(self, trigger: str) -> bool:
        """Re-read the file; True when the new config is running. Once started with a
        notifier, the service manager hears RELOADING before and READY after."""
        async with self._lock:
            notifier = self._notifier
            if notifier is not None:
                notifier.reloading()
            applied = False
            try:
                applied = await self._reload(trigger)
            finally:
                if notifier is not None:
                    outcome = "reloaded" if applied else "reload refused, the previous one runs"
                    notifier.ready(status=f"serving; config {outcome}")
            return applied

    async def _reload(self, trigger: str) -> bool:
        self._stamp = file_stamp(self._path)
        metrics = self._app[METRICS]
        audit = self._app[AUDIT]
        try:
            config = await asyncio.to_thread(load_config, self._path)
            restart = await apply_config(self._app, config)
        except ConfigError as exc:
            metrics.config_reloads_total.labels("failure").inc()
            log.error(
                "config reload refused, keeping the running config",
                extra=fields(trigger=trigger, file=str(self._path), problems=exc.problems),
            )
            await audit.record(
                "config.reload",
                actor="operator",
                client_ip=None,
                outcome="failure",
                trigger=trigger,
                problems=exc.problems,
            )
            return False
        except StoreUnavailable as exc:
            metrics.config_reloads_total.labels("failure").inc()
            log.error(
                "config reload could not reach the store, keeping the running config: %s",
                exc,
            )
            await audit.record(
                "config.reload",
                actor="operator",
                client_ip=None,
                outcome="failure",
                trigger=trigger,
                problems=[f"store unavailable: {exc}"],
            )
            return False
        metrics.config_reloads_total.labels("success").inc()
        if restart:
            log.warning(
                "config reloaded; these changes need a restart to take effect",
                extra=fields(trigger=trigger, restart_needed=restart),
            )
        else:
            log.info("config reloaded", extra=fields(trigger=trigger))
        warnings = config_warnings(config)
        log_config_warnings(warnings, trigger=trigger)
        await audit.record(
            "config.reload",
            actor="operator",
            client_ip=None,
            trigger=trigger,
            restart_needed=restart,
            warnings=warnings,
            pid=os.getpid(),  # with workers: N, each worker reloads and records it
        )
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            stamp = file_stamp(self._path)
            if stamp is not None and stamp != self._stamp:
                await self.reload("file changed")

    def start(self, notifier: Notifier | None = None) -> None:
        """Watch the file; from now on reloads are announced to ``notifier``."""
        self._notifier = notifier
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
