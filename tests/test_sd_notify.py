"""sd_notify(3) as the sidecar speaks it: addresses, message format, delivery."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from sidecar.sd_notify import Notifier, message, socket_address
from tests.notify_socket import service_manager


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@sidecar/notify", b"\0sidecar/notify"),
        ("@", None),
        ("relative/notify", None),
        ("vsock:2:1234", None),
        ("", None),
    ],
    ids=["path", "abstract", "empty-abstract", "relative", "vsock", "empty"],
)
def test_notify_socket_addresses(value: str, expected: str | bytes | None) -> None:
    assert socket_address(value) == expected


def test_a_status_text_cannot_forge_a_field() -> None:
    data = message({"READY": "1", "STATUS": "reload refused:\nSTOPPING=1\r\nERRNO=5"})
    assert data.decode().splitlines() == ["READY=1", "STATUS=reload refused: STOPPING=1 ERRNO=5"]


def test_notify_socket_is_taken_out_of_the_environment_for_children() -> None:
    environ = {"NOTIFY_SOCKET": "@x", "PATH": "/bin"}
    notifier = Notifier.from_environment(environ)
    assert notifier.address == b"\0x"
    assert environ == {"PATH": "/bin"}
    assert Notifier.from_environment(environ).address is None


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifications_reach_the_socket(abstract: bool) -> None:
    with service_manager(abstract) as manager:
        notifier = Notifier(socket_address(manager.address))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.ready(mainpid=4242)
        notifier.reloading()
        notifier.stopping()
        ready, reloading, stopping = manager.pending()
    assert ready == {"READY": "1", "MAINPID": "4242"}
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    assert stopping["STOPPING"] == "1"


def test_an_unreachable_service_manager_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="sidecar.sd_notify"):
        notifier.ready()
    assert "notification to the service manager not sent" in caplog.text
    Notifier(None).ready()  # not under systemd: nothing at all
