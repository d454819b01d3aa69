"""systemd's notification protocol (sd_notify(3)), without libsystemd.

With ``Type=notify`` systemd holds ``systemctl start``, ``systemctl reload`` and the units
ordered after the sidecar until it says so: ``READY=1`` once it accepts connections,
``RELOADING=1`` (with ``MONOTONIC_USEC``) when a reload begins and ``READY=1`` when it is
done, ``STOPPING=1`` when it begins to drain. A notification is one datagram of
``KEY=value`` lines sent to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path, or an
abstract name written with a leading ``@``).

Without ``NOTIFY_SOCKET`` (not started by systemd) every call does nothing. Sending never
fails the sidecar: a notification that cannot be sent is logged, and serving goes on.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("sidecar.sd_notify")

ENVIRONMENT_VARIABLE = "NOTIFY_SOCKET"
# A notification that cannot be queued within this long is dropped rather than holding up
# the event loop (the datagram is a few dozen bytes; systemd reads its socket promptly).
SEND_TIMEOUT_SECONDS = 1.0


def socket_address(value: str) -> str | bytes | None:
    """The address ``NOTIFY_SOCKET`` names: a path (absolute, as sd_notify requires) or an
    abstract socket name (``@name`` becomes ``\\0name``); None for anything else."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def message(fields: dict[str, str]) -> bytes:
    """One notification: ``KEY=value`` lines. A value never spans lines (a newline would
    start a field of its own, e.g. a forged ``READY=1`` inside a status text)."""
    lines = (f"{key}={' '.join(value.splitlines())}" for key, value in fields.items())
    return "\n".join(lines).encode()


class Notifier:
    """Tells the service manager what the sidecar is doing; does nothing without one."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str]) -> Notifier:
        """From ``NOTIFY_SOCKET``, which is taken out of ``environ`` (as sd_notify's
        ``unset_environment`` does): processes started from here, such as workers, must not
        speak for the service (systemd only listens to the main process)."""
        value = environ.pop(ENVIRONMENT_VARIABLE, None)
        if value is None:
            return cls(None)
        address = socket_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET %r is not a socket address; not notifying", value)
        return cls(address)

    def ready(self, *, status: str | None = None, mainpid: int | None = None) -> None:
        """Serving: started, or done reloading."""
        fields = {"READY": "1"}
        if mainpid is not None:
            fields["MAINPID"] = str(mainpid)
        if status is not None:
            fields["STATUS"] = status
        self.send(fields)

    def reloading(self) -> None:
        """A reload begins; ``ready`` follows when it is done. systemd reads MONOTONIC_USEC to
        tell this reload from an earlier one."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send({"RELOADING": "1", "MONOTONIC_USEC": str(usec), "STATUS": "reloading"})

    def stopping(self) -> None:
        """Draining and about to exit."""
        self.send({"STOPPING": "1", "STATUS": "stopping"})

    def send(self, fields: dict[str, str]) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT_SECONDS)
                sock.sendto(message(fields), self.address)
        except OSError as exc:
            log.warning("notification to the service manager not sent: %s", exc)
