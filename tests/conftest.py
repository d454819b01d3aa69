"""Shared fixtures: configs with fresh keys, and a sidecar in front of a stub upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from sidecar.app import build_app
from sidecar.config import Config, parse_config
from sidecar.listener import GuardedAppRunner
from sidecar.server import public_runner


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def raw_config(tmp_path: Path, upstream_url: str, **sections: Any) -> dict[str, Any]:
    """A minimal valid config as YAML would give it, with ``sections`` merged over it."""
    key = Fernet.generate_key().decode()
    base: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": upstream_url, "connect_timeout": "2s", "read_timeout": "5s"},
        "mfa": {
            "rp_id": "localhost",
            "origin": "http://localhost",
            "session": {"secret_keys": [key], "secure": False},
        },
        "storage": {"url": f"sqlite:///{tmp_path / 'state.db'}", "encryption_key": key},
        "audit": {"file": str(tmp_path / "audit.jsonl")},
    }
    return deep_merge(base, sections)


def make_config(tmp_path: Path, upstream_url: str, **sections: Any) -> Config:
    return parse_config(raw_config(tmp_path, upstream_url, **sections), env={})


SidecarFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def sidecar_for(
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> SidecarFactory:
    """``await sidecar_for(upstream_app, **config_sections)``: a test client talking to a
    sidecar whose upstream is ``upstream_app`` served on a real port."""

    async def factory(
        upstream_app: web.Application | str, **sections: Any
    ) -> TestClient[web.Request, web.Application]:
        if isinstance(upstream_app, str):
            url = upstream_app
        else:
            server = await aiohttp_server(upstream_app)
            url = f"http://127.0.0.1:{server.port}"
        config = make_config(tmp_path, url, **sections)
        return await aiohttp_client(build_app(config))

    return factory


@dataclass
class Served:
    """A sidecar on a real port, served by ``sidecar.server.public_runner``."""

    app: web.Application
    runner: GuardedAppRunner
    port: int
    upstream_url: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve_sidecar(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> AsyncIterator[ServeFactory]:
    """``await serve_sidecar(upstream_app, **config_sections)``: a sidecar served exactly as
    ``sidecar run`` serves it: the connection guards are on, and a handler is not cancelled
    when its client's connection drops (the test client's server cancels it)."""
    runners: list[GuardedAppRunner] = []

    async def factory(upstream_app: web.Application, **sections: Any) -> Served:
        upstream = await aiohttp_server(upstream_app)
        url = f"http://127.0.0.1:{upstream.port}"
        app = build_app(make_config(tmp_path, url, **sections))
        runner = public_runner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return Served(app, runner, site.port, url)

    yield factory
    for runner in runners:
        await runner.cleanup()
