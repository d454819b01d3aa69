"""IP restrictions end to end: client address, denylist then allowlist, through the proxy."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import BLOCKED, METRICS, swap_network_policy
from sidecar.config import parse_config
from sidecar.live import NetworkPolicy
from tests.conftest import SidecarFactory, raw_config

Hits = web.AppKey("hits", list[str])


def counting_upstream() -> web.Application:
    app = web.Application()
    app[Hits] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        app[Hits].append(request.path)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close()
            return ws
        return web.Response(text="console")

    app.router.add_get("/{tail:.*}", handler)
    return app


def decisions(client: Any) -> dict[str, float]:
    metrics = client.app[METRICS]
    return {
        decision: metrics.requests_total.labels(decision)._value.get()
        for decision in ("allowed", "denied_ip", "not_allowlisted")
    }


# The test client connects from 127.0.0.1; "behind a proxy" cases trust 127.0.0.1 and let
# X-Forwarded-For speak for the client.
TRUST_LOOPBACK = {"network": {"trusted_proxies": ["127.0.0.0/8"]}}

CASES = [
    pytest.param({}, None, 200, "allowed", id="no lists: everyone passes"),
    pytest.param(
        {"security": {"ip_denylist": ["127.0.0.1"]}}, None, 403, "denied_ip", id="peer denied"
    ),
    pytest.param(
        {"security": {"ip_allowlist": ["10.0.0.0/8"]}},
        None,
        403,
        "not_allowlisted",
        id="peer not on allowlist",
    ),
    pytest.param(
        {"security": {"ip_allowlist": ["127.0.0.0/8"]}}, None, 200, "allowed", id="allowlisted"
    ),
    pytest.param(
        {"security": {"ip_allowlist": ["127.0.0.0/8"], "ip_denylist": ["127.0.0.1/32"]}},
        None,
        403,
        "denied_ip",
        id="denylist wins over allowlist",
    ),
    pytest.param(
        {"security": {"ip_allowlist": ["203.0.113.0/24"]}},
        "203.0.113.7",
        403,
        "not_allowlisted",
        id="untrusted peer cannot spoof an allowlisted address",
    ),
    pytest.param(
        {**TRUST_LOOPBACK, "security": {"ip_allowlist": ["203.0.113.0/24"]}},
        "203.0.113.7",
        200,
        "allowed",
        id="client behind trusted proxy allowlisted",
    ),
    pytest.param(
        {**TRUST_LOOPBACK, "security": {"ip_denylist": ["2001:db8::/32"]}},
        "198.51.100.1, 2001:db8::5",
        403,
        "denied_ip",
        id="IPv6 client behind trusted proxy denied",
    ),
    pytest.param(
        {**TRUST_LOOPBACK, "security": {"ip_allowlist": ["198.51.100.0/24"]}},
        "198.51.100.1, not-an-ip, 203.0.113.9",
        403,
        "not_allowlisted",
        id="leftmost spoof never reached past the real client",
    ),
    pytest.param(
        {**TRUST_LOOPBACK, "security": {"ip_allowlist": ["198.51.100.0/24"]}},
        "198.51.100.1, junk",
        403,
        "denied_ip",
        id="malformed entry from trusted proxy refused",
    ),
]


@pytest.mark.parametrize(("sections", "xff", "status", "decision"), CASES)
async def test_gate_decides_before_the_upstream_sees_anything(
    sidecar_for: SidecarFactory,
    sections: dict[str, Any],
    xff: str | None,
    status: int,
    decision: str,
) -> None:
    upstream = counting_upstream()
    client = await sidecar_for(upstream, **sections)
    headers = {"X-Forwarded-For": xff} if xff else {}
    response = await client.get("/reports", headers=headers)
    assert response.status == status
    assert decisions(client)[decision] == 1
    if status == 403:
        assert upstream[Hits] == []
        assert response.content_type == "text/plain"
        assert "denied" in (await response.text()).lower()
    else:
        assert upstream[Hits] == ["/reports"]


async def test_websocket_upgrade_is_refused_before_any_101(sidecar_for: SidecarFactory) -> None:
    upstream = counting_upstream()
    client = await sidecar_for(upstream, security={"ip_denylist": ["127.0.0.0/8"]})
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws")
    assert refused.value.status == 403
    assert upstream[Hits] == []


async def test_block_status_is_configurable(sidecar_for: SidecarFactory) -> None:
    client = await sidecar_for(
        counting_upstream(),
        security={"ip_denylist": ["127.0.0.1"]},
        network={"block_status": 404},
    )
    assert (await client.get("/")).status == 404


async def test_blocks_are_audited_per_prefix_off_the_request_path_and_all_counted(
    sidecar_for: SidecarFactory, tmp_path: Path
) -> None:
    client = await sidecar_for(
        counting_upstream(),
        **TRUST_LOOPBACK,
        security={"ip_denylist": ["192.0.2.0/24", "2001:db8::/32"]},
    )
    for _ in range(5):
        await client.get("/", headers={"X-Forwarded-For": "192.0.2.1"})
    await client.get("/", headers={"X-Forwarded-For": "192.0.2.2"})
    await client.get("/", headers={"X-Forwarded-For": "[2001:db8::7]:443"})
    assert decisions(client)["denied_ip"] == 7

    def blocked() -> list[dict[str, Any]]:
        lines = (tmp_path / "audit.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["action"] == "ip.blocked"]

    assert blocked() == []  # written by the background writer, not by the requests
    await client.app[BLOCKED].flush()
    by_prefix = {r["client_ip"]: r for r in blocked()}
    assert set(by_prefix) == {"192.0.2.0/24", "2001:db8::/64"}
    v4 = by_prefix["192.0.2.0/24"]
    assert v4["outcome"] == "denied_ip"
    assert v4["details"]["count"] == 6
    assert v4["details"]["sample"] == ["192.0.2.1", "192.0.2.2"]
    assert v4["details"]["rules"] == ["192.0.2.0/24"]
    assert v4["details"]["list"] == "denylist"
    assert by_prefix["2001:db8::/64"]["details"]["count"] == 1


async def test_swapping_the_gate_applies_to_the_next_request(
    sidecar_for: SidecarFactory, tmp_path: Path
) -> None:
    upstream = counting_upstream()
    client = await sidecar_for(upstream)
    assert (await client.get("/")).status == 200
    config = parse_config(
        raw_config(tmp_path, "http://127.0.0.1:1", security={"ip_denylist": ["127.0.0.1"]}),
        env={},
    )
    swap_network_policy(client.app, NetworkPolicy.build(config))
    assert (await client.get("/")).status == 403
    metrics = client.app[METRICS]
    assert metrics.ip_rules.labels("denylist")._value.get() == 1


async def test_log_line_carries_peer_and_client(
    sidecar_for: SidecarFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await sidecar_for(counting_upstream(), **TRUST_LOOPBACK)
    with caplog.at_level("INFO", logger="sidecar.access"):
        await client.get("/", headers={"X-Forwarded-For": "203.0.113.50"})
    record = next(r for r in caplog.records if r.name == "sidecar.access")
    logged: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    assert logged["client_ip"] == "203.0.113.50"
    assert logged["peer"] == "127.0.0.1"


async def test_upstream_sees_the_resolved_client_only(sidecar_for: SidecarFactory) -> None:
    seen: list[str] = []
    upstream = web.Application()

    async def handler(request: web.Request) -> web.Response:
        seen.extend(request.headers.getall("X-Forwarded-For"))
        return web.Response(text="ok")

    upstream.router.add_get("/", handler)
    client = await sidecar_for(upstream, **TRUST_LOOPBACK)
    await client.get("/", headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.50"})
    assert seen == ["203.0.113.50"]
    assert ipaddress.ip_address(seen[0]).version == 4
