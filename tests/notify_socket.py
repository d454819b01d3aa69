"""The service manager's end of sd_notify(3), for tests: a datagram socket to name in
``NOTIFY_SOCKET`` (a short path, or an abstract name), and the notifications it receives."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sidecar.sd_notify import socket_address

Fields = dict[str, str]


class ServiceManager:
    """The receiving end of ``NOTIFY_SOCKET``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bound = socket_address(address)
        assert bound is not None
        self.sock.bind(bound)
        self.received: list[Fields] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> Fields | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(fields)
        return fields

    def pending(self) -> list[Fields]:
        """Whatever arrived so far, without waiting."""
        out = []
        while (fields := self._receive(0.001)) is not None:
            out.append(fields)
        return out

    async def next(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> Fields:
        """The next notification; fails if the process exits or none comes in time."""
        deadline = time.monotonic() + timeout
        while True:
            fields = await asyncio.to_thread(self._receive, 0.1)
            if fields is not None:
                return fields
            if proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {proc.returncode}, no notification")
            if time.monotonic() > deadline:
                raise AssertionError("no notification in time")


@contextmanager
def service_manager(abstract: bool = False) -> Iterator[ServiceManager]:
    if abstract:
        manager = ServiceManager(f"@sidecar-test-{uuid.uuid4().hex}")
        try:
            yield manager
        finally:
            manager.close()
        return
    # A short path: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as folder:
        manager = ServiceManager(os.path.join(folder, "notify"))
        try:
            yield manager
        finally:
            manager.close()
