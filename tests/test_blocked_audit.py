"""Blocked requests in the audit trail: aggregated per /24 and /64, written off the request path
in bounded batches, every block counted.

An attacker with many addresses must not turn the IP gate into a store-write amplifier: these
tests send floods from many addresses and count what reaches the store, and put a store that
hangs or fails behind the gate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

import sidecar.blocked_audit
from sidecar.app import BLOCKED, METRICS, STORE, build_app
from sidecar.blocked_audit import BlockedTally, BlockRecord
from sidecar.decision import Decision
from sidecar.net import IpAddress
from sidecar.store.base import StoreUnavailable
from tests.conftest import make_config

DENIED = Decision.DENIED_IP
NOT_ALLOWED = Decision.NOT_ALLOWLISTED
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z

Client = TestClient[web.Request, web.Application]


def ip(text: str) -> IpAddress:
    return ipaddress.ip_address(text)


def total(records: list[BlockRecord]) -> int:
    return sum(int(r.details["count"]) for r in records)


# --- the tally: pure, no I/O ----------------------------------------------------------------


def test_one_record_per_prefix_and_decision_with_counts_times_sample_and_rules() -> None:
    tally = BlockedTally()
    for i in range(7):
        tally.count(
            ip(f"192.0.2.{i}"), DENIED, rule=f"192.0.2.{i}/32", list_name="denylist", now=T0 + i
        )
    tally.count(ip("192.0.2.200"), NOT_ALLOWED, rule=None, list_name=None, now=T0 + 9)
    tally.count(ip("2001:db8:0:1::5"), DENIED, rule="2001:db8::/32", list_name="denylist", now=T0)
    tally.count(
        ip("2001:db8:0:1:ffff::9"), DENIED, rule="2001:db8::/32", list_name="denylist", now=T0
    )
    tally.count(ip("::1"), NOT_ALLOWED, rule=None, list_name=None, now=T0)
    records = {(r.client_ip, r.outcome): r.details for r in tally.take()}
    assert records[("192.0.2.0/24", "denied_ip")] == {
        "count": 7,
        "first": "2027-01-15T08:00:00+00:00",
        "last": "2027-01-15T08:00:06+00:00",
        "sample": [f"192.0.2.{i}" for i in range(5)],  # at most five
        "rules": [f"192.0.2.{i}/32" for i in range(5)],
        "list": "denylist",
    }
    assert records[("192.0.2.0/24", "not_allowlisted")]["count"] == 1
    assert records[("192.0.2.0/24", "not_allowlisted")]["rules"] == []
    assert records[("2001:db8:0:1::/64", "denied_ip")]["count"] == 2
    assert records[("2001:db8:0:1::/64", "denied_ip")]["rules"] == ["2001:db8::/32"]
    assert records[("::/64", "not_allowlisted")]["sample"] == ["::1"]
    assert len(records) == 4
    assert tally.take() == []  # taken: the next interval starts empty


def test_a_flood_from_many_prefixes_gives_the_top_ones_and_one_overflow_summary() -> None:
    tally = BlockedTally(max_prefixes=100, max_records=5)
    # Prefix n (10.0.n.0/24) sends n + 1 blocks, for n < 150: the last 50 do not fit the tally.
    for n in range(150):
        for _ in range(n + 1):
            tally.count(ip(f"10.0.{n}.1"), DENIED, rule="10.0.0.0/8", list_name="denylist", now=T0)
    records = tally.take()
    assert len(records) == 6
    assert [r.client_ip for r in records[:5]] == [f"10.0.{n}.0/24" for n in (99, 98, 97, 96, 95)]
    overflow = records[5]
    assert (overflow.client_ip, overflow.outcome) == (None, "overflow")
    assert overflow.details["prefixes_at_least"] == 95 + 1
    assert overflow.details["decisions"] == {"denied_ip": overflow.details["count"]}
    assert len(overflow.details["sample"]) == 5
    assert total(records) == sum(range(1, 151))


ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(lambda a: ipaddress.ip_address(int(a) & 0xFF_FF_0F_FF)),
    st.ip_addresses(v=6),
)


@given(st.lists(st.tuples(ADDRESSES, st.sampled_from([DENIED, NOT_ALLOWED])), max_size=300))
def test_whatever_arrives_the_records_are_bounded_and_the_counts_add_up(
    blocks: list[tuple[IpAddress, Decision]],
) -> None:
    tally = BlockedTally(max_prefixes=20, max_records=8)
    for address, decision in blocks:
        tally.count(address, decision, rule=None, list_name=None, now=T0)
    records = tally.take()
    assert len(records) <= 8 + 1
    assert total(records) == len(blocks)
    assert all(len(r.details["sample"]) <= 5 for r in records)


# --- through the sidecar --------------------------------------------------------------------

BEHIND_BALANCER = {
    "network": {"trusted_proxies": ["127.0.0.0/8"]},
    "security": {"ip_denylist": ["10.0.0.0/8"]},
}


def console() -> web.Application:
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="console")

    app.router.add_get("/{tail:.*}", page)
    return app


class StoreWrites:
    """Replaces the store's audit append: records each call, then hangs, fails or appends."""

    def __init__(self, client: Client, mode: str = "append") -> None:
        self.calls: list[dict[str, Any]] = []
        self.mode = mode
        audit = client.app[STORE].audit
        self._append = audit.append
        audit.append = self  # type: ignore[method-assign]

    async def __call__(self, **record: Any) -> Any:
        self.calls.append(record)
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "unavailable":
            raise StoreUnavailable("database is down")
        if self.mode == "broken":
            raise RuntimeError("unexpected")
        return await self._append(**record)

    def blocked(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["action"] == "ip.blocked"]


@pytest.fixture
def start(
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[Client]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Callable[..., Awaitable[Client]]:
    async def factory(**sections: Any) -> Client:
        upstream = await aiohttp_server(console())
        app = build_app(make_config(tmp_path, f"http://127.0.0.1:{upstream.port}", **sections))
        # Only the flushes the test asks for: the writes are counted per flush.
        app[BLOCKED].interval = 3600.0
        return await aiohttp_client(app)

    return factory


def from_many(n: int) -> list[str]:
    """n client addresses in 10.0.0.0/8, three per /24."""
    return [f"10.{i // 3 // 256}.{i // 3 % 256}.{i % 3 + 1}" for i in range(n)]


async def blocked_requests(client: Client, addresses: list[str]) -> list[int]:
    async def one(address: str) -> int:
        async with client.get("/", headers={"X-Forwarded-For": address}) as response:
            return response.status

    statuses: list[int] = []
    for start in range(0, len(addresses), 100):
        batch = addresses[start : start + 100]
        statuses += await asyncio.gather(*(one(a) for a in batch))
    return statuses


async def test_a_thousand_blocks_from_many_addresses_make_a_bounded_number_of_writes(
    start: Callable[..., Awaitable[Client]], tmp_path: Path
) -> None:
    client = await start(**BEHIND_BALANCER)
    writes = StoreWrites(client)
    addresses = from_many(1000)
    assert await blocked_requests(client, addresses) == [403] * 1000
    assert writes.blocked() == []  # nothing on the request path
    assert client.app[METRICS].requests_total.labels("denied_ip")._value.get() == 1000
    assert await client.app[BLOCKED].flush() == 51
    stored = writes.blocked()
    assert len(stored) == 51  # 50 prefixes and one overflow summary, for 334 prefixes
    details = [json.loads(call["details"]) for call in stored]
    assert sum(d["count"] for d in details) == 1000
    prefixes = [call["client_ip"] for call in stored[:50]]
    assert all(ipaddress.ip_network(p).prefixlen == 24 for p in prefixes)
    assert len(set(prefixes)) == 50
    assert stored[-1]["client_ip"] is None
    assert stored[-1]["outcome"] == "overflow"
    assert details[-1]["prefixes_at_least"] == len({a.rsplit(".", 1)[0] for a in addresses}) - 50
    # The same records, chained, in the audit file.
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    in_file = [line for line in lines if line["action"] == "ip.blocked"]
    assert len(in_file) == 51
    assert all("hash" in line for line in in_file)
    assert await client.app[BLOCKED].flush() == 0  # counted once


async def test_what_was_counted_is_written_at_shutdown(
    start: Callable[..., Awaitable[Client]], tmp_path: Path
) -> None:
    client = await start(**BEHIND_BALANCER)
    assert await blocked_requests(client, ["10.1.2.3"] * 4 + ["10.1.2.4"]) == [403] * 5
    await client.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (record,) = [line for line in lines if line["action"] == "ip.blocked"]
    assert record["client_ip"] == "10.1.2.0/24"
    assert record["outcome"] == "denied_ip"
    assert record["details"]["count"] == 5
    assert record["details"]["sample"] == ["10.1.2.3", "10.1.2.4"]
    assert record["details"]["rules"] == ["10.0.0.0/8"]
    assert record["details"]["list"] == "denylist"


@pytest.mark.parametrize("mode", ["hang", "unavailable", "broken"])
async def test_a_store_that_hangs_or_fails_never_slows_or_fails_blocked_requests(
    start: Callable[..., Awaitable[Client]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    monkeypatch.setattr(sidecar.blocked_audit, "FINAL_FLUSH_SECONDS", 0.2)
    client = await start(**BEHIND_BALANCER)
    writes = StoreWrites(client, mode)
    statuses = await asyncio.wait_for(blocked_requests(client, from_many(300)), 30)
    assert statuses == [403] * 300
    if mode != "hang":
        # A failed write is logged; the next flush writes the next interval's records.
        assert await client.app[BLOCKED].flush() == 51
        assert await blocked_requests(client, ["10.9.9.9"]) == [403]
        assert await client.app[BLOCKED].flush() == 1
        assert len(writes.blocked()) == 52
    await asyncio.wait_for(client.close(), 30)  # a hanging store delays shutdown boundedly
    if mode == "unavailable":
        lines = (tmp_path / "audit.jsonl").read_text().splitlines()
        unchained = [json.loads(line) for line in lines if '"ip.blocked"' in line]
        assert len(unchained) == 52
        assert all(line["chained"] is False for line in unchained)
