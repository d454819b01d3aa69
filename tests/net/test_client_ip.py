"""resolve_client_ip and parse_ip: who the client is, and that forged headers never decide it.

Trusted proxies in every case: 10.0.0.0/8 and fd00::/8. Client addresses come from the
documentation ranges: 203.0.113.0/24 and 2001:db8::/32 play the real client, 198.51.100.66
plays the address an attacker writes into the header.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.net import (
    CidrSet,
    ClientIpHeader,
    IpAddress,
    Unresolved,
    normalize_ip,
    parse_ip,
    resolve_client_ip,
)

XFF = ClientIpHeader.X_FORWARDED_FOR
FWD = ClientIpHeader.FORWARDED
XRI = ClientIpHeader.X_REAL_IP

TRUSTED_NETWORKS = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv6Network("fd00::/8"),
)
TRUSTED = CidrSet(TRUSTED_NETWORKS)
PROXY = "10.0.0.1"
CLIENT = "203.0.113.7"
SPOOF = "198.51.100.66"


@dataclass(frozen=True)
class Case:
    id: str
    peer: str | None
    lines: tuple[str, ...]
    # The address resolve_client_ip must return, or None when it must refuse.
    expected: str | None
    header: ClientIpHeader = XFF
    # For refusals: a piece of text the reason must contain.
    reason: str = ""


CASES = [
    # A peer we do not trust is the client, whatever it wrote into any header.
    Case("untrusted peer, spoofed XFF ignored", "203.0.113.9", (SPOOF,), "203.0.113.9"),
    Case(
        "untrusted peer, spoofed XFF of a trusted address", "203.0.113.9", (PROXY,), "203.0.113.9"
    ),
    Case("untrusted peer, junk XFF ignored", "203.0.113.9", ("junk, , _x",), "203.0.113.9"),
    Case("untrusted peer, spoofed Forwarded", "203.0.113.9", (f"for={SPOOF}",), "203.0.113.9", FWD),
    Case("untrusted peer, spoofed X-Real-IP", "203.0.113.9", (SPOOF,), "203.0.113.9", XRI),
    Case("untrusted IPv6 peer", "2001:db8::9", (SPOOF,), "2001:db8::9"),
    # Through trusted proxies, counted from the right.
    Case("one trusted hop", PROXY, (CLIENT,), CLIENT),
    Case("leftmost spoof through a trusted proxy", PROXY, (f"{SPOOF}, {CLIENT}",), CLIENT),
    Case("spoofed trusted address left of the client", PROXY, (f"10.0.0.5, {CLIENT}",), CLIENT),
    Case(
        "several trusted hops skipped from the right",
        PROXY,
        (f"{SPOOF}, {CLIENT}, 10.0.0.3, fd00::2",),
        CLIENT,
    ),
    Case("two header lines joined in order", PROXY, (f"{SPOOF}, {CLIENT}", "10.0.0.2"), CLIENT),
    Case("two header lines, last line's entry is rightmost", PROXY, (CLIENT, SPOOF), SPOOF),
    Case("no spaces after commas", PROXY, (f"{SPOOF},{CLIENT},10.0.0.2",), CLIENT),
    Case("every entry trusted: the leftmost", PROXY, ("10.0.0.3, 10.0.0.2",), "10.0.0.3"),
    # Address forms.
    Case("IPv4 with port", PROXY, (f"{CLIENT}:4711",), CLIENT),
    Case("IPv6 bracketed with port", PROXY, ("[2001:db8::7]:4711",), "2001:db8::7"),
    Case("IPv6 bracketed", PROXY, ("[2001:db8::7]",), "2001:db8::7"),
    Case("IPv6 bare", PROXY, ("2001:db8::7",), "2001:db8::7"),
    Case("trusted IPv6 hop with port skipped", PROXY, (f"{CLIENT}, [fd00::2]:80",), CLIENT),
    Case("zone id in an entry", PROXY, ("fe80::1%eth0",), "fe80::1"),
    Case("zone id in a bracketed entry", PROXY, ("[fe80::1%25eth0]:80",), "fe80::1"),
    Case("zone id on the peer", "fd00::1%eth0", (CLIENT,), CLIENT),
    Case("IPv4-mapped trusted peer", "::ffff:10.0.0.1", (CLIENT,), CLIENT),
    Case("IPv4-mapped untrusted peer comes back as IPv4", "::ffff:203.0.113.9", (), "203.0.113.9"),
    Case("IPv4-mapped trusted entry skipped", PROXY, (f"{CLIENT}, ::ffff:10.0.0.2",), CLIENT),
    Case("IPv4-mapped client entry", PROXY, ("[::ffff:203.0.113.7]:80",), CLIENT),
    # An entry that does not parse ends the walk: never skip to attacker text further left.
    Case("junk rightmost", PROXY, (f"{CLIENT}, junk",), None, reason="'junk'"),
    Case("junk in the middle", PROXY, (f"{SPOOF}, junk, 10.0.0.2",), None, reason="malformed"),
    Case("junk between two trusted hops", PROXY, (f"{SPOOF}, 10.0.0.3, x, 10.0.0.2",), None),
    # The walk stops at the first untrusted entry, so junk left of the client is never read.
    Case("junk left of the client is never reached", PROXY, (f"junk, {CLIENT}",), CLIENT),
    Case("empty entry", PROXY, (f"{SPOOF}, , 10.0.0.2",), None, reason="empty X-Forwarded-For"),
    Case("trailing comma", PROXY, (f"{CLIENT},",), None, reason="empty"),
    Case("empty line after a real one", PROXY, (CLIENT, ""), None, reason="empty"),
    Case("unknown in XFF", PROXY, ("unknown",), None),
    Case("host name", PROXY, ("client.example.com",), None),
    Case("leading zeros are ambiguous", PROXY, ("010.0.0.1",), None),
    Case("CIDR is not an address", PROXY, ("203.0.113.0/24",), None),
    Case("port out of range", PROXY, (f"{CLIENT}:65536",), None),
    Case("IPv4 in brackets", PROXY, (f"[{CLIENT}]",), None),
    Case("zone id on IPv4", PROXY, (f"{CLIENT}%eth0",), None),
    # A trusted peer must say who it forwards for.
    Case(
        "trusted peer, no header", PROXY, (), None, reason="trusted proxy sent no X-Forwarded-For"
    ),
    Case("trusted peer, blank header", PROXY, ("  ",), None, reason="sent no X-Forwarded-For"),
    Case("trusted peer, no Forwarded", PROXY, (), None, FWD, "sent no Forwarded"),
    Case("trusted peer, no X-Real-IP", PROXY, (), None, XRI, "sent no X-Real-IP"),
    Case("peer unknown", None, (CLIENT,), None, reason="peer address unknown"),
    Case("peer is a unix socket", "/run/sidecar.sock", (CLIENT,), None, reason="not an IP"),
    Case("peer empty", "", (CLIENT,), None, reason="not an IP"),
    # RFC 7239 Forwarded.
    Case("Forwarded plain", PROXY, (f"for={CLIENT}",), CLIENT, FWD),
    Case("Forwarded quoted IPv4", PROXY, (f'for="{CLIENT}"',), CLIENT, FWD),
    Case(
        "Forwarded quoted IPv6 with port", PROXY, ('for="[2001:db8::1]:4711"',), "2001:db8::1", FWD
    ),
    Case("Forwarded quoted IPv4-mapped", PROXY, ('for="[::ffff:203.0.113.7]"',), CLIENT, FWD),
    Case(
        "Forwarded unquoted brackets (lenient)", PROXY, ("for=[2001:db8::1]",), "2001:db8::1", FWD
    ),
    Case("Forwarded mixed case For=", PROXY, (f"For={CLIENT};Proto=https",), CLIENT, FWD),
    Case("Forwarded upper case FOR=", PROXY, (f"FOR={CLIENT}",), CLIENT, FWD),
    Case(
        "Forwarded other parameters", PROXY, (f"proto=https;for={CLIENT};by={PROXY}",), CLIENT, FWD
    ),
    Case("Forwarded space around pairs", PROXY, (f"for={SPOOF} , for={CLIENT} ",), CLIENT, FWD),
    Case(
        "Forwarded trusted hops skipped",
        PROXY,
        (f'for={SPOOF}, for={CLIENT}, for="[fd00::2]:80", for=10.0.0.2',),
        CLIENT,
        FWD,
    ),
    Case("Forwarded two lines", PROXY, (f"for={SPOOF}", f"for={CLIENT}"), CLIENT, FWD),
    Case("Forwarded obfuscated port", PROXY, (f'for="{CLIENT}:_p0rt"',), CLIENT, FWD),
    Case(
        "Forwarded quoted comma does not split elements",
        PROXY,
        (f'for={CLIENT};ext="a, for={SPOOF}"',),
        CLIENT,
        FWD,
    ),
    Case(
        "Forwarded quoted semicolon does not split pairs",
        PROXY,
        (f'ext="x;for={SPOOF}";for={CLIENT}',),
        CLIENT,
        FWD,
    ),
    Case(
        "Forwarded escaped quote does not end the string",
        PROXY,
        (f'ext="a\\", for={SPOOF}";for={CLIENT}',),
        CLIENT,
        FWD,
    ),
    Case("Forwarded unknown", PROXY, (f"for={SPOOF}, for=unknown",), None, FWD, "for=unknown"),
    Case("Forwarded quoted UNKNOWN", PROXY, ('for="UNKNOWN"',), None, FWD, "for=unknown"),
    Case(
        "Forwarded unknown left of the client", PROXY, (f"for=unknown, for={CLIENT}",), CLIENT, FWD
    ),
    Case("Forwarded obfuscated _hidden", PROXY, ("for=_hidden",), None, FWD, "obfuscated"),
    Case(
        "Forwarded obfuscated between hops",
        PROXY,
        (f"for={SPOOF}, for=_abc, for=10.0.0.2",),
        None,
        FWD,
        "obfuscated",
    ),
    Case("Forwarded element without for=", PROXY, (f"proto=https;by={PROXY}",), None, FWD, "for="),
    Case("Forwarded empty element", PROXY, (f"for={SPOOF},,for=10.0.0.2",), None, FWD, "for="),
    Case("Forwarded empty for=", PROXY, ("for=",), None, FWD, "malformed"),
    Case("Forwarded repeated for=", PROXY, (f"for={CLIENT};for={SPOOF}",), None, FWD, "repeats"),
    Case("Forwarded pair without =", PROXY, (f"for={CLIENT};junk",), None, FWD, "malformed"),
    Case("Forwarded junk after quotes", PROXY, (f'for="{CLIENT}"x',), None, FWD, "malformed"),
    Case(
        "Forwarded unterminated quote swallows the proxy's element",
        PROXY,
        (f'for="{SPOOF}', "for=10.0.0.2"),
        None,
        FWD,
        "unterminated",
    ),
    # X-Real-IP: one address per line, set by the proxy.
    Case("X-Real-IP", PROXY, (CLIENT,), CLIENT, XRI),
    Case("X-Real-IP with port", PROXY, (f"{CLIENT}:80",), CLIENT, XRI),
    Case("X-Real-IP lines walked from the right", PROXY, (SPOOF, CLIENT), CLIENT, XRI),
    Case(
        "X-Real-IP holds no list", PROXY, (f"{SPOOF}, {CLIENT}",), None, XRI, "malformed X-Real-IP"
    ),
    Case("X-Real-IP trusted value", PROXY, ("10.0.0.2",), "10.0.0.2", XRI),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_resolve_client_ip(case: Case) -> None:
    result = resolve_client_ip(case.peer, case.lines, TRUSTED, case.header)
    if case.expected is None:
        assert isinstance(result, Unresolved), result
        assert case.reason in result.reason
    else:
        assert result == ipaddress.ip_address(case.expected)


def test_refusal_reason_quotes_and_truncates_attacker_text() -> None:
    evil = "\x1b[31m" + "A" * 500
    result = resolve_client_ip(PROXY, [evil], TRUSTED, XFF)
    assert isinstance(result, Unresolved)
    assert "\x1b" not in result.reason
    assert len(result.reason) < 120


PARSE_CASES = [
    ("IPv4", "192.0.2.1", "192.0.2.1"),
    ("IPv4 with whitespace", " \t192.0.2.1 ", "192.0.2.1"),
    ("IPv4 with port", "192.0.2.1:8080", "192.0.2.1"),
    ("IPv6", "2001:db8::1", "2001:db8::1"),
    ("IPv6 bracketed", "[2001:db8::1]", "2001:db8::1"),
    ("IPv6 bracketed with port", "[2001:db8::1]:443", "2001:db8::1"),
    ("IPv6 zone", "fe80::1%eth0", "fe80::1"),
    ("IPv6 bracketed zone and port", "[fe80::1%eth0]:1", "fe80::1"),
    ("IPv4-mapped", "::ffff:192.0.2.1", "192.0.2.1"),
    ("IPv4-mapped hex", "::ffff:c000:201", "192.0.2.1"),
    ("IPv4-compatible is not unwrapped", "::192.0.2.1", "::c000:201"),
    ("empty", "", None),
    ("blank", "   ", None),
    ("host name", "localhost", None),
    ("integer", "3221225985", None),
    ("hex octet", "0xc0.0.2.1", None),
    ("leading zero", "192.0.2.01", None),
    ("three octets", "192.0.2", None),
    ("octet too big", "192.0.2.256", None),
    ("CIDR", "192.0.2.0/24", None),
    ("empty port", "192.0.2.1:", None),
    ("non-ASCII digit port", "192.0.2.1:\u00b2", None),
    ("port too long", "192.0.2.1:000080", None),
    ("unclosed bracket", "[2001:db8::1", None),
    ("junk after bracket", "[2001:db8::1]x", None),
    ("IPv6 bracket port out of range", "[2001:db8::1]:99999", None),
    ("IPv4 zone", "192.0.2.1%eth0", None),
    ("fullwidth digits", "\uff11.2.3.4", None),
    ("unix socket path", "/run/app.sock", None),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [(text, expected) for _, text, expected in PARSE_CASES],
    ids=[name for name, _, _ in PARSE_CASES],
)
def test_parse_ip(text: str, expected: str | None) -> None:
    result = parse_ip(text)
    assert result == (None if expected is None else ipaddress.ip_address(expected))


def test_normalize_ip() -> None:
    assert normalize_ip(ipaddress.IPv6Address("::ffff:10.0.0.1")) == ipaddress.IPv4Address(
        "10.0.0.1"
    )
    assert normalize_ip(ipaddress.IPv6Address("2001:db8::1")) == ipaddress.IPv6Address(
        "2001:db8::1"
    )
    assert normalize_ip(ipaddress.IPv4Address("10.0.0.1")) == ipaddress.IPv4Address("10.0.0.1")


# --- Hypothesis: attacker-controlled header text -------------------------------------------


def _is_trusted(addr: IpAddress) -> bool:
    """Linear reference for TRUSTED, independent of CidrSet."""
    addr = normalize_ip(addr)
    return any(addr in network for network in TRUSTED_NETWORKS)


trusted_addresses = st.one_of(
    st.ip_addresses(network="10.0.0.0/8"), st.ip_addresses(network="fd00::/8")
)
untrusted_addresses = st.ip_addresses().filter(lambda a: not _is_trusted(a))


@st.composite
def address_text(draw: st.DrawFn, addresses: st.SearchStrategy[IpAddress]) -> tuple[str, IpAddress]:
    """An address in one of the forms proxies write, and the address it must parse to."""
    addr = draw(addresses)
    port = draw(st.integers(1, 65535))
    if isinstance(addr, ipaddress.IPv4Address):
        forms = [str(addr), f"{addr}:{port}", f"::ffff:{addr}", f"[::ffff:{addr}]:{port}"]
    else:
        forms = [str(addr), f"[{addr}]", f"[{addr}]:{port}", f"{addr}%eth0"]
    return draw(st.sampled_from(forms)), normalize_ip(addr)


entries = st.one_of(address_text(trusted_addresses), address_text(untrusted_addresses))
junk = st.one_of(
    st.sampled_from(["", " ", "unknown", "_hidden", "1.2.3", "300.1.1.1", "::fffff", "[::1"]),
    st.text(max_size=20),
).filter(
    # ":_" would be an RFC 7239 obfuscated port, which Forwarded drops, leaving an address.
    lambda t: parse_ip(t) is None and not any(c in t for c in (",", '"', "\\", ":_"))
)


def _render(header: ClientIpHeader, text: str) -> str:
    # Forwarded values are quoted: the tested property is about the walk, not the syntax.
    return f'for="{text}"' if header is ClientIpHeader.FORWARDED else text


def _reference_walk(walked: list[tuple[str, IpAddress]]) -> IpAddress | None:
    """Right-to-left walk over known-good entries; None when it runs off the left end."""
    for _, addr in reversed(walked):
        if not _is_trusted(addr):
            return addr
    return None


@settings(max_examples=300)
@given(st.text())
def test_parse_ip_never_raises(text: str) -> None:
    result = parse_ip(text)
    assert result is None or isinstance(result, ipaddress.IPv4Address | ipaddress.IPv6Address)


@settings(max_examples=300)
@given(address_text(st.ip_addresses()))
def test_parse_ip_reads_every_form_proxies_write(form: tuple[str, IpAddress]) -> None:
    text, addr = form
    assert parse_ip(text) == addr


@settings(max_examples=300)
@given(
    peer=st.one_of(st.none(), st.text(max_size=45), trusted_addresses.map(str)),
    lines=st.lists(st.text(), max_size=4),
    header=st.sampled_from(ClientIpHeader),
)
def test_resolve_never_raises(peer: str | None, lines: list[str], header: ClientIpHeader) -> None:
    result = resolve_client_ip(peer, lines, TRUSTED, header)
    assert isinstance(result, Unresolved | ipaddress.IPv4Address | ipaddress.IPv6Address)


@settings(max_examples=300)
@given(
    peer=untrusted_addresses,
    lines=st.lists(st.text(), max_size=4),
    header=st.sampled_from(ClientIpHeader),
)
def test_untrusted_peer_is_always_the_client(
    peer: IpAddress, lines: list[str], header: ClientIpHeader
) -> None:
    assert resolve_client_ip(str(peer), lines, TRUSTED, header) == normalize_ip(peer)


@settings(max_examples=300)
@given(
    peer=trusted_addresses,
    left=st.lists(entries, max_size=4),
    bad=junk,
    right=st.lists(entries, max_size=4),
    header=st.sampled_from([XFF, FWD]),
    one_line=st.booleans(),
)
def test_walk_never_passes_an_unparseable_entry(
    peer: IpAddress,
    left: list[tuple[str, IpAddress]],
    bad: str,
    right: list[tuple[str, IpAddress]],
    header: ClientIpHeader,
    one_line: bool,
) -> None:
    texts = [_render(header, t) for t, _ in left] + [_render(header, bad)]
    texts += [_render(header, t) for t, _ in right]
    lines = [", ".join(texts)] if one_line else texts
    result = resolve_client_ip(str(peer), lines, TRUSTED, header)
    expected = _reference_walk(right)
    if expected is None:
        # Only trusted hops right of the junk: the walk reaches it and refuses.
        assert isinstance(result, Unresolved)
    else:
        assert result == expected
    assert not isinstance(result, Unresolved) or result.reason


@settings(max_examples=300)
@given(
    peer=trusted_addresses,
    walked=st.lists(entries, min_size=1, max_size=6),
    header=st.sampled_from(ClientIpHeader),
)
def test_walk_of_well_formed_entries(
    peer: IpAddress, walked: list[tuple[str, IpAddress]], header: ClientIpHeader
) -> None:
    texts = [_render(header, t) for t, _ in walked]
    lines = texts if header is XRI else [", ".join(texts)]
    expected = _reference_walk(walked)
    if expected is None:  # every hop trusted: the leftmost entry is the client
        expected = walked[0][1]
    assert resolve_client_ip(str(peer), lines, TRUSTED, header) == expected
