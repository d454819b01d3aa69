"""IpGate and CidrSet: denylist first, then allowlist, and the rule that decided."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.decision import Decision
from sidecar.net import CidrSet, GateVerdict, IpAddress, IpGate, IpNetwork, normalize_ip


def net(text: str) -> IpNetwork:
    return ipaddress.ip_network(text)


@dataclass(frozen=True)
class Case:
    id: str
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    ip: str
    decision: Decision
    rule: str | None = None  # the configured network reported, as configured


ALLOWED, DENIED, NOT_LISTED = Decision.ALLOWED, Decision.DENIED_IP, Decision.NOT_ALLOWLISTED

CASES = [
    Case("empty lists: unrestricted", (), (), "192.0.2.1", ALLOWED),
    Case("empty allowlist, no deny match: unrestricted", (), ("10.0.0.0/8",), "192.0.2.1", ALLOWED),
    Case("denylist match", (), ("10.0.0.0/8",), "10.1.2.3", DENIED, "10.0.0.0/8"),
    Case(
        "denylist wins over allowlist",
        ("10.0.0.0/8",),
        ("10.0.0.0/8",),
        "10.0.0.1",
        DENIED,
        "10.0.0.0/8",
    ),
    Case(
        "denylist hole inside the allowlist",
        ("10.0.0.0/8",),
        ("10.1.0.0/16",),
        "10.1.2.3",
        DENIED,
        "10.1.0.0/16",
    ),
    Case(
        "allowed beside the hole",
        ("10.0.0.0/8",),
        ("10.1.0.0/16",),
        "10.2.0.1",
        ALLOWED,
        "10.0.0.0/8",
    ),
    Case("allowlist miss", ("10.0.0.0/8",), (), "192.0.2.1", NOT_LISTED),
    Case("IPv6 allowlist match", ("2001:db8::/32",), (), "2001:db8::1", ALLOWED, "2001:db8::/32"),
    Case("IPv6 allowlist miss", ("2001:db8::/32",), (), "2001:db9::1", NOT_LISTED),
    Case(
        "IPv6 denylist", (), ("2001:db8:bad::/48",), "2001:db8:bad::7", DENIED, "2001:db8:bad::/48"
    ),
    Case("IPv4 rule never matches IPv6", ("0.0.0.0/0",), (), "2001:db8::1", NOT_LISTED),
    Case("IPv6 rule never matches IPv4", ("::/0",), (), "192.0.2.1", NOT_LISTED),
    Case("::/0 does not cover IPv4-mapped clients", (), ("::/0",), "::ffff:192.0.2.1", ALLOWED),
    Case(
        "mapped address, IPv4 rule", ("10.0.0.0/8",), (), "::ffff:10.1.2.3", ALLOWED, "10.0.0.0/8"
    ),
    Case(
        "mapped rule, IPv4 address: reported as configured",
        (),
        ("::ffff:10.0.0.0/104",),
        "10.1.2.3",
        DENIED,
        "::ffff:10.0.0.0/104",
    ),
    Case(
        "mapped rule, mapped address",
        ("::ffff:10.0.0.0/104",),
        (),
        "::ffff:10.1.2.3",
        ALLOWED,
        "::ffff:10.0.0.0/104",
    ),
    Case("mapped rule misses other IPv4", ("::ffff:10.0.0.0/104",), (), "11.0.0.1", NOT_LISTED),
    Case("bare /32 hit", (), ("192.0.2.7/32",), "192.0.2.7", DENIED, "192.0.2.7/32"),
    Case("bare /32 neighbour", (), ("192.0.2.7/32",), "192.0.2.8", ALLOWED),
    Case("bare /128 hit", (), ("2001:db8::7/128",), "2001:db8::7", DENIED, "2001:db8::7/128"),
    Case("bare /128 neighbour", (), ("2001:db8::7/128",), "2001:db8::6", ALLOWED),
    Case("0.0.0.0/0 denies all IPv4", (), ("0.0.0.0/0",), "255.255.255.255", DENIED, "0.0.0.0/0"),
    Case("lowest IPv4", ("0.0.0.0/32",), (), "0.0.0.0", ALLOWED, "0.0.0.0/32"),
    Case("lowest IPv6", ("::/128",), (), "::", ALLOWED, "::/128"),
    Case(
        "highest IPv6",
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",),
        (),
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ALLOWED,
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
    ),
    Case("highest IPv6 does not spill into IPv4", ("::/0",), (), "0.0.0.0", NOT_LISTED),
    Case("highest IPv4 does not spill into IPv6", ("0.0.0.0/0",), (), "::", NOT_LISTED),
    Case(
        "highest IPv4",
        ("255.255.255.255/32",),
        (),
        "255.255.255.255",
        ALLOWED,
        "255.255.255.255/32",
    ),
    Case(
        "nested: most specific reported",
        ("10.0.0.0/8", "10.1.2.0/24", "10.1.0.0/16"),
        (),
        "10.1.2.3",
        ALLOWED,
        "10.1.2.0/24",
    ),
    Case(
        "nested: middle rule",
        ("10.0.0.0/8", "10.1.2.0/24", "10.1.0.0/16"),
        (),
        "10.1.3.1",
        ALLOWED,
        "10.1.0.0/16",
    ),
    Case(
        "nested: outer rule after the inner ones end",
        ("10.0.0.0/8", "10.1.2.0/24", "10.1.0.0/16"),
        (),
        "10.200.0.1",
        ALLOWED,
        "10.0.0.0/8",
    ),
    Case(
        "nested: outer rule between two inner ones",
        ("10.0.0.0/8", "10.1.0.0/16", "10.5.0.0/16"),
        (),
        "10.3.0.1",
        ALLOWED,
        "10.0.0.0/8",
    ),
    Case(
        "nested ending together: outer rule just past the end",
        ("10.0.0.0/8", "10.255.0.0/16"),
        (),
        "11.0.0.0",
        NOT_LISTED,
    ),
    Case(
        "adjacent halves",
        ("10.0.0.0/9", "10.128.0.0/9"),
        (),
        "10.128.0.0",
        ALLOWED,
        "10.128.0.0/9",
    ),
    Case("duplicates", ("10.0.0.0/8", "10.0.0.0/8"), (), "10.0.0.1", ALLOWED, "10.0.0.0/8"),
    Case(
        "same network twice, two spellings: the first configured",
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        (),
        "10.0.0.1",
        ALLOWED,
        "::ffff:10.0.0.0/104",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    gate = IpGate(allowlist=map(net, case.allow), denylist=map(net, case.deny))
    verdict = gate.decide(ipaddress.ip_address(case.ip))
    assert verdict.decision is case.decision
    assert verdict.rule == (None if case.rule is None else net(case.rule))
    if case.rule is not None:
        assert str(verdict.rule) == str(net(case.rule))  # as configured, not normalized
    expected_list = {DENIED: "denylist", ALLOWED: "allowlist" if case.allow else None}
    assert verdict.list_name == expected_list.get(case.decision)


def test_cidr_set_len_counts_distinct_networks() -> None:
    networks = ["10.0.0.0/8", "10.0.0.0/8", "::ffff:10.0.0.0/104", "2001:db8::/32", "::/0"]
    assert len(CidrSet(map(net, networks))) == 3
    assert len(CidrSet([])) == 0


def test_cidr_set_membership_and_rule() -> None:
    cidrs = CidrSet([net("10.0.0.0/8"), net("10.1.0.0/16")])
    assert ipaddress.ip_address("::ffff:10.1.0.1") in cidrs
    assert ipaddress.ip_address("11.0.0.0") not in cidrs
    assert cidrs.matching_rule(ipaddress.ip_address("10.1.0.1")) == net("10.1.0.0/16")
    assert cidrs.matching_rule(ipaddress.ip_address("11.0.0.0")) is None


def test_cidr_set_refuses_strings() -> None:
    with pytest.raises(TypeError, match="IPv4Network"):
        CidrSet(["10.0.0.0/8"])  # type: ignore[list-item]


def test_common_verdicts_are_shared_not_built_per_request() -> None:
    gate = IpGate(allowlist=[net("10.0.0.0/8")], denylist=[])
    inside, outside = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("192.0.2.1")
    assert gate.decide(inside) is gate.decide(ipaddress.ip_address("10.9.9.9"))
    assert gate.decide(outside) is gate.decide(ipaddress.ip_address("192.0.2.2"))
    open_gate = IpGate(allowlist=[], denylist=[net("10.0.0.0/8")])
    assert open_gate.decide(outside) is open_gate.decide(ipaddress.ip_address("192.0.2.2"))


# --- Hypothesis: the gate agrees with a linear scan over ipaddress networks ----------------

_MAPPED_BLOCK = ipaddress.IPv6Network("::ffff:0:0/96")


def normalize_network(network: IpNetwork) -> IpNetwork:
    """Reference: a network inside ::ffff:0:0/96 is the IPv4 network it maps."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_BLOCK):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def reference_matches(networks: list[IpNetwork], ip: IpAddress) -> list[IpNetwork]:
    addr = normalize_ip(ip)
    # ipaddress answers False across versions, which is the semantics wanted.
    return [n for n in networks if addr in normalize_network(n)]


def assert_most_specific(rule: IpNetwork | None, matches: list[IpNetwork]) -> None:
    assert rule is not None
    best = max(normalize_network(n).prefixlen for n in matches)
    # Laminar CIDRs: one normalized network has the longest prefix; the first configured
    # spelling of it is reported.
    first = next(n for n in matches if normalize_network(n).prefixlen == best)
    assert rule is first


BASES_V4 = [0, 0x0A000000, 0xC0000200, 0xFFFFFF00]
BASES_V6 = [0, 0x20010DB8 << 96, 0xFD00 << 112, (1 << 128) - 256, 0xFFFF << 32]


@st.composite
def networks(draw: st.DrawFn) -> IpNetwork:
    """Random valid networks, clustered so that they overlap, nest and touch often."""
    kind = draw(st.sampled_from(["v4", "v6", "mapped"]))
    if kind == "v4":
        bits, base = 32, draw(st.sampled_from(BASES_V4))
    elif kind == "v6":
        bits, base = 128, draw(st.sampled_from(BASES_V6))
    else:
        bits, base = 128, 0xFFFF << 32
    prefix = draw(st.integers(96 if kind == "mapped" else 0, bits))
    low = draw(
        st.one_of(
            st.integers(0, 0xFFFF),
            st.integers(0, (1 << (bits - 96 if kind == "mapped" else bits)) - 1),
        )
    )
    value = (base | low) & ((1 << bits) - 1)
    # strict=False clears the host bits, which is what makes the network valid.
    if bits == 32:
        return ipaddress.IPv4Network((value, prefix), strict=False)
    return ipaddress.IPv6Network((value, prefix), strict=False)


@st.composite
def gate_inputs(draw: st.DrawFn) -> tuple[list[IpNetwork], list[IpNetwork], list[IpAddress]]:
    allow = draw(st.lists(networks(), max_size=8))
    deny = draw(st.lists(networks(), max_size=8))
    configured = allow + deny
    addresses: list[IpAddress] = draw(st.lists(st.ip_addresses(), max_size=3))
    for network in draw(st.lists(st.sampled_from(configured), max_size=6)) if configured else []:
        # The edges of a network and their outside neighbours are where off-by-ones live.
        first, last = int(network.network_address), int(network.broadcast_address)
        value = draw(st.sampled_from([first, last, first - 1, last + 1, (first + last) // 2]))
        cls = ipaddress.IPv4Address if network.version == 4 else ipaddress.IPv6Address
        if 0 <= value < (1 << network.max_prefixlen):
            addresses.append(cls(value))
    # Dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d.
    addresses += [
        ipaddress.IPv6Address((0xFFFF << 32) | int(a)) for a in addresses if a.version == 4
    ]
    return allow, deny, addresses


@settings(max_examples=300)
@given(gate_inputs())
def test_gate_agrees_with_linear_scan(
    inputs: tuple[list[IpNetwork], list[IpNetwork], list[IpAddress]],
) -> None:
    allow, deny, addresses = inputs
    gate = IpGate(allowlist=allow, denylist=deny)
    for ip in addresses:
        verdict = gate.decide(ip)
        denied_by = reference_matches(deny, ip)
        allowed_by = reference_matches(allow, ip)
        assert (ip in gate.denylist) == bool(denied_by)
        assert (ip in gate.allowlist) == bool(allowed_by)
        if denied_by:
            assert (verdict.decision, verdict.list_name) == (Decision.DENIED_IP, "denylist")
            assert_most_specific(verdict.rule, denied_by)
        elif not allow:
            assert verdict == GateVerdict(Decision.ALLOWED, None, None)
        elif not allowed_by:
            assert verdict == GateVerdict(Decision.NOT_ALLOWLISTED, None, None)
        else:
            assert (verdict.decision, verdict.list_name) == (Decision.ALLOWED, "allowlist")
            assert_most_specific(verdict.rule, allowed_by)
        for cidrs, configured in ((gate.allowlist, allow), (gate.denylist, deny)):
            rule = cidrs.matching_rule(ip)
            assert rule is None or any(rule is n for n in configured)
    assert len(gate.allowlist) == len({normalize_network(n) for n in allow})
    assert len(gate.denylist) == len({normalize_network(n) for n in deny})
