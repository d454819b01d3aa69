"""``sidecar demo``: the demo console with the sidecar in front of it, on this machine.

Everything lives under one folder (default ``./demo-data``): generated keys (kept so that
sessions survive a restart), the SQLite state and the audit log. Cookies are not marked
Secure because the demo is served over plain http on localhost.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.fernet import Fernet

from sidecar.config import Config, ConfigError, parse_config
from sidecar.demo_console import API_TOKEN_CREDENTIAL, DEMO_USERS, build_demo_console
from sidecar.logs import configure_logging
from sidecar.server import run_until_stopped, serve
from sidecar.settings import SettingsService
from sidecar.store import open_store


def _keys(data_dir: Path) -> dict[str, str]:
    """The demo's session and data keys, generated on first use and kept in ``keys.json``.

    The file is created with mode 0600 in the same call that creates it (``O_EXCL``): a
    write-then-chmod would leave the keys readable by everyone for a moment under the usual
    umask, and a file someone else created first is read, never overwritten.
    """
    path = data_dir / "keys.json"
    keys = {"session": Fernet.generate_key().decode(), "data": Fernet.generate_key().decode()}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        kept: dict[str, str] = json.loads(path.read_text())
        return kept
    with os.fdopen(fd, "w") as file:
        json.dump(keys, file)
    return keys


def demo_config(
    *, host: str, port: int, admin_port: int, console_port: int, data_dir: Path
) -> Config:
    """The demo's configuration, built the same way as a YAML file is validated."""
    keys = _keys(data_dir)
    public_host = "localhost"
    raw: dict[str, Any] = {
        "listen": {"host": host, "port": port, "drain_timeout": "2s"},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "upstream": {"url": f"http://127.0.0.1:{console_port}"},
        "security": {"mfa_policy": "admins", "grace_period": "72h"},
        # The demo console tells its API tokens from its session token (also when that is
        # sent as a bearer token): only API tokens skip the MFA gate.
        "identity": {
            "introspect": {"api_token": {"field": "credential", "value": API_TOKEN_CREDENTIAL}}
        },
        "mfa": {
            "rp_id": public_host,
            "rp_name": "Demo Console",
            "origin": [f"http://{public_host}:{port}", f"http://127.0.0.1:{port}"]
            if port != 80
            else [f"http://{public_host}"],
            "session": {"secret_keys": [keys["session"]], "secure": False},
        },
        "storage": {
            "url": f"sqlite:///{(data_dir / 'state.db').resolve()}",
            "encryption_key": keys["data"],
        },
        "audit": {"file": str((data_dir / "audit.jsonl").resolve())},
        "logging": {"level": "info", "format": "text"},
    }
    # rp_id must match every origin's host; 127.0.0.1 is offered for convenience only
    # when it cannot conflict.
    raw["mfa"]["origin"] = [o for o in raw["mfa"]["origin"] if "//localhost" in o]
    return parse_config(raw, env={})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def seed_demo_state(config: Config) -> None:
    """Make the demo show the rollout: policy ``admins``; alice (owner) is past her grace
    period, bob (admin) inside it, carol and dave (members) are not required."""
    store = open_store(config.storage.url, config.storage.encryption_key)
    try:
        await store.migrate()
        settings = SettingsService(store, config, lambda _: None)
        await settings.load()
        now = datetime.now(UTC)
        starts = {"u-alice": now - timedelta(days=4), "u-bob": now - timedelta(hours=20)}
        for user in DEMO_USERS:
            await store.users.touch(user.id, email=user.email, role=user.role, now=now)
            if user.id in starts:
                await store.users.grace_started(user.id, starts[user.id])
    finally:
        await store.close()


async def _demo(config: Config, console_port: int) -> None:
    await seed_demo_state(config)
    console = web.AppRunner(build_demo_console(), access_log=None)
    await console.setup()
    await web.TCPSite(console, "127.0.0.1", console_port).start()
    try:
        await serve(config)
    finally:
        await console.cleanup()


def run_demo(*, host: str, port: int, data_dir: str, admin_port: int = 9090) -> int:
    folder = Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    console_port = _free_port()
    try:
        config = demo_config(
            host=host,
            port=port,
            admin_port=admin_port,
            console_port=console_port,
            data_dir=folder,
        )
    except ConfigError as exc:  # pragma: no cover - the demo config is fixed
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    configure_logging(config.logging.level, config.logging.format)
    url = f"http://localhost:{port}/"
    print(
        f"\nDemo console behind the sidecar: {url}\n"
        f"  metrics and health:  http://127.0.0.1:{admin_port}/metrics\n"
        f"  state and keys in:   {folder.resolve()}\n"
        f"  console (upstream):  http://127.0.0.1:{console_port}/ (not exposed)\n\n"
        "Users (password 'demo' for all):",
        flush=True,
    )
    notes = {
        "u-alice": "MFA required, grace period over: must set up MFA",
        "u-bob": "MFA required, inside the grace period",
    }
    for user in DEMO_USERS:
        note = notes.get(user.id, "member: MFA optional")
        print(f"  {user.id.removeprefix('u-'):<8} {user.role:<7} {note}", flush=True)
    print(
        "\nAPI tokens skip the MFA gate, the session token sent as a bearer token does not:\n"
        f"  curl -H 'Authorization: Bearer demo-token-alice' {url}api/reports\n"
        "\nStop with Ctrl-C.\n",
        flush=True,
    )
    try:
        run_until_stopped(_demo(config, console_port))
    except OSError as exc:
        print(f"cannot start the demo: {exc}", file=sys.stderr)
        return 1
    return 0
