"""How the sidecar's processes take SIGHUP, SIGTERM and SIGINT, before the event loop runs
(:class:`StartupSignals`) and once it does (:class:`LoopSignals`).

Python leaves SIGHUP at the system's default action, which ends the process, and SIGTERM
ends it without stopping what started. Start-up takes a while (imports, the store's
migrations, the IP lists, binding the port), and a reload (``systemctl reload``, an
editor's hook, a file watcher) or a stop may be asked for meanwhile. ``sidecar run``
installs :class:`StartupSignals` first thing (each worker too); :class:`LoopSignals` takes
the signals over once the event loop runs and reads what arrived before:

- SIGHUP: a reload is owed, applied once the sidecar serves (before it reports ready);
- SIGTERM, SIGINT: the start-up ends at the next step, what started is stopped, exit 0.

The early handlers only set flags: Python runs them between any two bytecodes of the main
thread, in the middle of whatever it was doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class StartupSignals:
    """What arrived before the event loop handles the signals itself."""

    def __init__(self) -> None:
        self.reload_requested = False
        self.stop_requested = False
        self._previous: dict[signal.Signals, _Handler] = {}

    @classmethod
    def install(cls) -> StartupSignals:
        """Catch SIGHUP, SIGTERM and SIGINT from now on (main thread only)."""
        signals = cls()
        for sig, handler in (
            (signal.SIGHUP, signals._reload),
            (signal.SIGTERM, signals._stop),
            (signal.SIGINT, signals._stop),
        ):
            signals._previous[sig] = signal.signal(sig, handler)
        return signals

    def restore(self) -> None:
        """The handlers from before ``install`` (for a command that returns without
        serving, e.g. on an invalid config: its caller may be a test, or a shell)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True


class LoopSignals:
    """The process's signals, handled by the event loop: SIGTERM and SIGINT set ``stop``;
    SIGHUP calls the reload handler once serving, and is owed (remembered) until then."""

    def __init__(self, loop: asyncio.AbstractEventLoop, early: StartupSignals | None) -> None:
        self._loop = loop
        self.stop = asyncio.Event()
        self._on_reload: Callable[[], None] | None = None
        self._reload_owed = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        # Read after the loop's handlers are in: each signal reached one or the other.
        if early is not None:
            if early.stop_requested:
                self.stop.set()
            self._reload_owed = early.reload_requested

    def _sighup(self) -> None:
        if self._on_reload is None:
            self._reload_owed = True
        else:
            self._on_reload()

    def take_owed_reload(self) -> bool:
        owed, self._reload_owed = self._reload_owed, False
        return owed

    def serving(self, on_reload: Callable[[], None]) -> None:
        """SIGHUP reloads from now on, including one that arrived since the last take."""
        self._on_reload = on_reload
        if self.take_owed_reload():
            on_reload()

    def close(self) -> None:
        """The loop lets go of the signals; they are ignored from then on (the process is
        about to exit: a late SIGHUP must not kill it with a non-zero status)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
