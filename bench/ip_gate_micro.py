"""Micro-benchmark: IpGate lookups against large lists, and client IP resolution.

Run: ``python bench/ip_gate_micro.py``. Deterministic inputs (fixed seed); timings are the best
of several repeats, per lookup. Compare a 100,000-network gate with a 10-network one (lookup
cost must not grow linearly) and with a linear scan over 10,000 networks.
"""

from __future__ import annotations

import ipaddress
import random
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.net import (
    CidrSet,
    ClientIpHeader,
    IpAddress,
    IpGate,
    IpNetwork,
    resolve_client_ip,
)

SEED = 20240601
LOOKUPS = 2_000
REPEATS = 5


def random_networks(rng: random.Random, count: int) -> list[IpNetwork]:
    """~70% IPv4 (/20../32, mostly /24 and /32 as in threat feeds), ~30% IPv6 (/32../128)."""
    networks: list[IpNetwork] = []
    for _ in range(count):
        if rng.random() < 0.7:
            prefix = rng.choice([20, 22, 24, 24, 24, 28, 32, 32, 32, 32])
            value = rng.getrandbits(32)
            networks.append(ipaddress.IPv4Network((value, prefix), strict=False))
        else:
            prefix = rng.choice([32, 48, 56, 64, 64, 128])
            value = (0x2000 << 112) | rng.getrandbits(125)  # global unicast 2000::/3
            networks.append(ipaddress.IPv6Network((value, prefix), strict=False))
    return networks


def random_address(rng: random.Random) -> IpAddress:
    if rng.random() < 0.7:
        return ipaddress.IPv4Address(rng.getrandbits(32))
    return ipaddress.IPv6Address((0x2000 << 112) | rng.getrandbits(125))


def inside(rng: random.Random, network: IpNetwork) -> IpAddress:
    offset = rng.randrange(network.num_addresses)
    return network.network_address + offset


def per_call_us(func: Callable[[IpAddress], object], addresses: Sequence[IpAddress]) -> float:
    def run() -> None:
        for ip in addresses:
            func(ip)

    best = min(timeit.repeat(run, number=1, repeat=REPEATS))
    return best / len(addresses) * 1e6


def build(allow: list[IpNetwork], deny: list[IpNetwork]) -> tuple[IpGate, float, int, int]:
    """The gate, its build time (untraced) and what a second, traced build holds / peaks at."""
    started = time.perf_counter()
    gate = IpGate(allowlist=allow, denylist=deny)
    elapsed = time.perf_counter() - started
    del gate
    tracemalloc.start()
    gate = IpGate(allowlist=allow, denylist=deny)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return gate, elapsed, current, peak


def gate_row(rng: random.Random, label: str, count: int) -> tuple[str, ...]:
    deny = random_networks(rng, count)
    gate, seconds, current, peak = build([], deny)
    misses: list[IpAddress] = []
    while len(misses) < LOOKUPS:
        candidate = random_address(rng)
        if candidate not in gate.denylist:
            misses.append(candidate)
    hits = [inside(rng, rng.choice(deny)) for _ in range(LOOKUPS)]
    assert all(gate.decide(ip).rule is not None for ip in hits)
    return (
        label,
        f"{seconds * 1e3:,.1f}",
        f"{current / 2**20:,.1f} / {peak / 2**20:,.1f}",
        f"{per_call_us(gate.decide, misses):.2f}",
        f"{per_call_us(gate.decide, hits):.2f}",
    )


def linear_row(rng: random.Random, count: int) -> tuple[str, ...]:
    deny = random_networks(rng, count)

    def scan(ip: IpAddress) -> IpNetwork | None:
        for network in deny:
            if ip in network:
                return network
        return None

    reference = CidrSet(deny)
    misses = [ip for ip in (random_address(rng) for _ in range(200)) if ip not in reference]
    hits = [inside(rng, rng.choice(deny)) for _ in range(200)]
    return (
        f"linear scan, {count:,}",
        "-",
        "-",
        f"{per_call_us(scan, misses):.2f}",
        f"{per_call_us(scan, hits):.2f}",
    )


def resolve_rows() -> list[tuple[str, str]]:
    trusted = CidrSet([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")])
    xff, fwd = ClientIpHeader.X_FORWARDED_FOR, ClientIpHeader.FORWARDED
    cases: list[tuple[str, str, list[str], ClientIpHeader]] = [
        ("untrusted peer (headers ignored)", "203.0.113.9", ["198.51.100.1"], xff),
        ("trusted peer, one XFF entry", "10.0.0.1", ["203.0.113.7"], xff),
        (
            "trusted peer, XFF spoof + 2 hops",
            "10.0.0.1",
            ["198.51.100.1, 203.0.113.7, 10.0.0.2"],
            xff,
        ),
        ("trusted peer, Forwarded one element", "10.0.0.1", ["for=203.0.113.7;proto=https"], fwd),
        ("trusted peer, Forwarded quoted IPv6", "10.0.0.1", ['for="[2001:db8::7]:4711"'], fwd),
    ]
    number = 20_000
    rows = []
    for label, peer, lines, header in cases:

        def run(
            peer: str = peer, lines: list[str] = lines, header: ClientIpHeader = header
        ) -> None:
            resolve_client_ip(peer, lines, trusted, header)

        best = min(timeit.repeat(run, number=number, repeat=REPEATS))
        rows.append((label, f"{best / number * 1e6:.2f}"))
    return rows


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        first = row[0].ljust(widths[0])
        return "  ".join(
            [first, *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def main() -> None:
    rng = random.Random(SEED)
    rows = [
        gate_row(rng, "IpGate, 100,000 deny CIDRs", 100_000),
        gate_row(rng, "IpGate, 10 deny CIDRs", 10),
        linear_row(rng, 10_000),
    ]
    python = sys.version.split()[0]
    print(f"Python {python}, seed {SEED}, ~70% IPv4 / 30% IPv6, per call, best of {REPEATS}")
    print()
    print(table(("IP gate", "build ms", "MiB now / peak", "miss µs", "hit µs"), rows))
    print()
    print(table(("resolve_client_ip", "µs"), resolve_rows()))


if __name__ == "__main__":
    main()
