"""``sidecar demo``: its key file (created private, kept across restarts) and what its
sidecar lets through."""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app import build_app
from sidecar.demo import _keys, demo_config, seed_demo_state
from sidecar.demo_console import SESSION_COOKIE, build_demo_console

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The most permissive umask: any mode the code does not set itself shows up."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_zero")
def test_key_file_is_private_from_the_moment_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every file descriptor opened on the key file, with its mode at that instant: a
    # write-then-chmod would show a world-readable file here, however briefly.
    modes_at_creation: list[int] = []
    real_open = os.open

    def spying_open(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        fd = real_open(path, flags, *args, **kw)
        if Path(path).name == "keys.json":
            modes_at_creation.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    monkeypatch.setattr(os, "open", spying_open)
    keys = _keys(tmp_path)
    assert modes_at_creation == [0o600]
    assert _mode(tmp_path / "keys.json") == 0o600
    assert set(keys) == {"session", "data"}


@pytest.mark.usefixtures("umask_zero")
def test_keys_are_kept_across_restarts(tmp_path: Path) -> None:
    first = _keys(tmp_path)
    assert _keys(tmp_path) == first
    assert _mode(tmp_path / "keys.json") == 0o600


def test_a_planted_symlink_is_not_written_through(tmp_path: Path) -> None:
    # Someone who can write the data folder points keys.json elsewhere before the first
    # start: the demo must not write fresh keys into the link's target.
    target = tmp_path / "elsewhere"
    (tmp_path / "keys.json").symlink_to(target)
    with pytest.raises(FileNotFoundError):
        _keys(tmp_path)
    assert not target.exists()


async def test_the_demo_sidecar_tells_api_tokens_from_the_session_token(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    # What the README's curl lines show: alice (owner, past her grace period) reaches the
    # API with her API token, but her browser's session token sent as a bearer token meets
    # the MFA gate like the browser does.
    console = await aiohttp_server(build_demo_console())
    assert console.port is not None
    config = demo_config(
        host="127.0.0.1", port=8080, admin_port=9090, console_port=console.port, data_dir=tmp_path
    )
    await seed_demo_state(config)
    client = await aiohttp_client(build_app(config))
    api = await client.get("/api/reports", headers={"Authorization": "Bearer demo-token-alice"})
    assert api.status == 200
    login = await client.post(
        "/login", data={"username": "alice", "password": "demo"}, allow_redirects=False
    )
    assert login.status == 303
    session = client.session.cookie_jar.filter_cookies(client.make_url("/"))[SESSION_COOKIE]
    client.session.cookie_jar.clear()
    held = await client.get("/api/reports", headers={"Authorization": f"Bearer {session.value}"})
    assert held.status == 403
    assert (await held.json())["error"] == "mfa_setup_required"
