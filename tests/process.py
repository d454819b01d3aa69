"""A sidecar running as its own process (``python -m sidecar run``), for tests that need the
real server: memory use, signals, several processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import deep_merge, raw_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SidecarProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin_port: int) -> None:
        self.proc = proc
        self.port = port
        self.admin_port = admin_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def peak_rss_bytes(self) -> int:
        """VmHWM: the most resident memory the process has had so far."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")


def write_config(tmp_path: Path, upstream_url: str, **sections: Any) -> tuple[Path, int, int]:
    """``tmp_path/sidecar.yaml`` on free ports; (its path, the public port, the admin port)."""
    port, admin_port = free_port(), free_port()
    raw = deep_merge(
        raw_config(tmp_path, upstream_url, **sections),
        {"listen": {"port": port}, "admin": {"port": admin_port}},
    )
    raw.setdefault("logging", {"level": "warning"})
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, port, admin_port


def spawn(tmp_path: Path, config: Path, env: Mapping[str, str] = {}) -> subprocess.Popen[bytes]:
    """``sidecar run --config config``, its output in ``tmp_path/sidecar.log``; not waited
    for (see ``run_sidecar``), stopped by ``stop``."""
    with (tmp_path / "sidecar.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still running 10 s later."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` now (``SigCgt`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    raise AssertionError("no SigCgt in /proc status")


def wait_until_catching(proc: subprocess.Popen[bytes], *signals: signal.Signals) -> None:
    """Poll (10 s at most) until ``proc`` handles each of ``signals``: from then on, sending
    one tests the process's handling rather than the interpreter's start."""
    deadline = time.monotonic() + 10
    while not all(catches(proc.pid, sig) for sig in signals):
        if proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise AssertionError(f"sidecar does not catch {signals} after 10 s")
        time.sleep(0.002)


@contextlib.contextmanager
def run_sidecar(tmp_path: Path, upstream_url: str, **sections: Any) -> Iterator[SidecarProcess]:
    path, port, admin_port = write_config(tmp_path, upstream_url, **sections)
    proc = spawn(tmp_path, path)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    "sidecar exited: " + (tmp_path / "sidecar.log").read_text(errors="replace")
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield SidecarProcess(proc, port, admin_port)
    finally:
        stop(proc)
