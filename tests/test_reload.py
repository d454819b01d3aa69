"""Reload semantics in process: all or nothing, and audited."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import IDENTITY_PROVIDER, LIVE, METRICS, STORE, build_app
from sidecar.config import load_config
from sidecar.identity.introspect import IntrospectProvider
from sidecar.reload import Reloader
from sidecar.store.base import StoreUnavailable
from tests.conftest import raw_config

Client = TestClient[web.Request, web.Application]


async def start(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]], **sections: Any
) -> tuple[Client, Path, dict[str, Any]]:
    raw = raw_config(tmp_path, "http://127.0.0.1:1", **sections)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    client = await aiohttp_client(build_app(load_config(path)))
    return client, path, raw


def audit_records(tmp_path: Path, action: str) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["action"] == action]


async def test_a_reload_that_cannot_reach_the_store_changes_nothing(
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[Client]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, path, raw = await start(tmp_path, aiohttp_client)
    app = client.app
    before = app[LIVE].config
    raw["mfa"]["exempt_paths"] = ["/public/"]
    raw["mfa"]["lockout"] = {"max_failures": 1}
    path.write_text(yaml.safe_dump(raw))

    async def down(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(app[STORE].settings, "current", down)
    assert await Reloader(app, path).reload("test") is False
    assert app[LIVE].config is before
    failures = app[METRICS].config_reloads_total.labels("failure")._value.get()
    assert failures == 1
    assert audit_records(tmp_path, "config.reload")[-1]["outcome"] == "failure"


async def test_a_reload_under_managed_by_config_audits_old_and_new_values(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client, path, raw = await start(
        tmp_path, aiohttp_client, security={"managed_by": "config", "mfa_policy": "optional"}
    )
    raw["security"]["mfa_policy"] = "all"
    raw["security"]["ip_denylist"] = ["192.0.2.0/24"]
    path.write_text(yaml.safe_dump(raw))
    assert await Reloader(client.app, path).reload("test") is True
    changed = audit_records(tmp_path, "security.settings.changed")[-1]
    assert changed["actor"] == "config"
    assert changed["details"]["changes"]["mfa_policy"] == {"old": "optional", "new": "all"}
    assert changed["details"]["changes"]["ip_denylist"] == {"old": [], "new": ["192.0.2.0/24"]}
    assert len(client.app[LIVE].network.gate.denylist) == 1  # and enforced from now on


async def test_a_store_unreachable_at_start_is_migrated_and_loaded_when_it_appears(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    import asyncio
    import time

    later = tmp_path / "later"
    later.write_text("a file where the volume's folder should be")
    raw = raw_config(tmp_path, "http://127.0.0.1:1")
    raw["storage"]["url"] = f"sqlite:///{later / 'state.db'}"
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    client = await aiohttp_client(build_app(load_config(path)))
    refused = await client.get("/anything")
    assert refused.status == 503  # fail closed: the IP lists were never loaded
    later.unlink()
    later.mkdir()  # the volume appears
    deadline = time.monotonic() + 8
    while not client.app[LIVE].loaded:
        assert time.monotonic() < deadline, "not recovered"
        await asyncio.sleep(0.1)
    assert (await client.get("/anything")).status == 502  # judged, then forwarded (no upstream)


async def test_a_provider_retired_by_a_reload_is_closed_when_the_app_stops(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    # Left to its 30 s timer, a retired introspection provider's HTTP session outlived the
    # app (an unclosed-session warning at exit, or in whichever test ran next).
    client, path, raw = await start(tmp_path, aiohttp_client)
    app = client.app
    retired = app[IDENTITY_PROVIDER].provider
    assert isinstance(retired, IntrospectProvider)
    raw["identity"] = {"introspect": {"cache_ttl": "10s"}}
    path.write_text(yaml.safe_dump(raw))
    assert await Reloader(app, path).reload("test") is True
    assert app[IDENTITY_PROVIDER].provider is not retired
    assert not retired._closed  # requests may still hold it
    await client.close()
    assert retired._closed
