"""Which address a request comes from: the TCP peer, or what trusted proxies say it is.

Pure and I/O-free: takes the peer address string and the raw header lines, returns an address
or an :class:`Unresolved` refusal. The aiohttp glue (reading ``request.remote`` and
``request.headers.getall(...)``, answering a refusal) lives elsewhere.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    from sidecar.net.ip_gate import CidrSet

IpAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIpHeader(enum.StrEnum):
    """The forwarding header a trusted proxy writes (config ``network.client_ip_header``)."""

    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"
    X_REAL_IP = "x-real-ip"


@dataclass(frozen=True, slots=True)
class Unresolved:
    """Why the client address could not be determined; the request must be refused.

    ``reason`` is short text for logs. Attacker-written parts are shown with ``repr`` and cut
    to a few dozen characters, so it is safe to log as is.
    """

    reason: str


# How the headers are spelled in messages (the enum values are the lower-case field names).
_SPELLING: Final = MappingProxyType(
    {
        ClientIpHeader.X_FORWARDED_FOR: "X-Forwarded-For",
        ClientIpHeader.FORWARDED: "Forwarded",
        ClientIpHeader.X_REAL_IP: "X-Real-IP",
    }
)
_SHOW_MAX: Final = 64

# RFC 7239 §4 (via RFC 7230 §3.2.6): a quoted-string may hold "," and ";", so elements and
# pairs are split only outside quotes. Each pattern matches one part up to the next unquoted
# separator; the alternatives start on different characters, so matching stays linear.
_QUOTED: Final = r'"(?:[^"\\]|\\.)*"'
_ELEMENT_PART: Final = re.compile(rf'(?:{_QUOTED}|[^",])*', re.DOTALL)
_PAIR_PART: Final = re.compile(rf'(?:{_QUOTED}|[^";])*', re.DOTALL)
_QUOTED_VALUE: Final = re.compile(_QUOTED, re.DOTALL)
_QUOTED_PAIR: Final = re.compile(r"\\(.)", re.DOTALL)
# RFC 7230 §3.2.6 token, for parameter names.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 7239 §6.3: obfport = "_" 1*(ALPHA / DIGIT / "." / "_" / "-").
_OBFUSCATED_PORT: Final = re.compile(r"_[0-9A-Za-z._-]+")


def _show(text: str) -> str:
    """Attacker-written text, fit for a log line: repr'd and cut short."""
    if len(text) > _SHOW_MAX:
        return repr(text[:_SHOW_MAX]) + "..."
    return repr(text)


def normalize_ip(addr: IpAddress) -> IpAddress:
    """Return the IPv4 address inside an IPv4-mapped IPv6 one (``::ffff:a.b.c.d``), else ``addr``.

    A dual-stack socket reports IPv4 clients in mapped form, and ``ipaddress`` never matches a
    mapped address against an IPv4 network, so every comparison goes through this first.
    """
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr


def _is_port(text: str) -> bool:
    # isascii() first: str.isdigit() also accepts digits such as "²" that int() refuses.
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and int(text) <= 65535


def _parse_v4(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def _parse_v6(text: str) -> IpAddress | None:
    # The zone id ("fe80::1%eth0", or "%25eth0" as RFC 6874 writes it in URLs) names a local
    # interface; it says nothing about who the client is and would defeat equality.
    text = text.partition("%")[0]
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    mapped = addr.ipv4_mapped
    return addr if mapped is None else mapped


def parse_ip(text: str) -> IpAddress | None:
    """Parse one address token as proxies write it, or return None. Never raises for a str.

    Accepts ``a.b.c.d``, ``a.b.c.d:port``, an IPv6 address with or without brackets,
    ``[v6]:port`` and a ``%zone`` suffix on IPv6 (dropped), with surrounding whitespace.
    IPv4-mapped IPv6 comes back as IPv4. Everything else, including host names, IPv4 with
    leading zeros (ambiguous: octal or decimal?), bare integers and CIDR notation, is None.
    """
    text = text.strip()
    if not text:
        return None
    if text[0] == "[":
        close = text.find("]")
        if close < 0:
            return None
        rest = text[close + 1 :]
        if rest and not (rest[0] == ":" and _is_port(rest[1:])):
            return None
        return _parse_v6(text[1:close])
    colons = text.count(":")
    if colons == 0:
        return _parse_v4(text)
    if colons == 1:
        host, _, port = text.partition(":")
        return _parse_v4(host) if _is_port(port) else None
    return _parse_v6(text)


def _split_outside_quotes(text: str, part: re.Pattern[str], sep: str) -> tuple[list[str], bool]:
    """Split ``text`` on ``sep`` outside quoted strings.

    Returns the parts and whether the text ended inside an unterminated quoted string (the
    parts then stop just before it).
    """
    if '"' not in text:
        return text.split(sep), False
    parts: list[str] = []
    pos, end = 0, len(text)
    while True:
        match = part.match(text, pos)  # always matches, if only the empty string
        stop = match.end() if match is not None else pos
        parts.append(text[pos:stop])
        if stop == end:
            return parts, False
        if text[stop] != sep:  # an opening quote that is never closed
            return parts, True
        pos = stop + 1


def _forwarded_for(element: str) -> IpAddress | Unresolved:
    """The address in one RFC 7239 forwarded-element's ``for`` parameter, or why there is none."""
    pairs, _ = _split_outside_quotes(element, _PAIR_PART, ";")
    value: str | None = None
    for pair in pairs:
        # RFC 7239 §4: forwarded-element = [ forwarded-pair ] *( ";" [ forwarded-pair ] )
        if not pair.strip():
            continue
        name, eq, raw = pair.partition("=")
        name = name.strip()
        if not eq or _TOKEN.fullmatch(name) is None:
            return Unresolved(f"malformed Forwarded element {_show(element.strip())}")
        if name.lower() != "for":
            continue  # by=, host=, proto= and extensions (RFC 7239 §5.5) do not matter here
        if value is not None:
            # RFC 7239 §4: each parameter MUST NOT occur more than once per element.
            return Unresolved(f"Forwarded element repeats for= {_show(element.strip())}")
        raw = raw.strip()
        if raw.startswith('"'):
            if _QUOTED_VALUE.fullmatch(raw) is None:
                return Unresolved(f"malformed Forwarded element {_show(element.strip())}")
            raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
        value = raw
    if value is None:
        return Unresolved(f"Forwarded element without for= {_show(element.strip())}")
    # RFC 7239 §6: node = nodename [ ":" node-port ]; nodename may be "unknown" (§6.2) or an
    # obfuscated identifier "_..." (§6.3). Neither names an address: the hop is not known, so
    # nothing to its left can be vouched for either.
    if value.lower() == "unknown":
        return Unresolved("Forwarded for=unknown")
    if value.startswith("_"):
        return Unresolved(f"Forwarded for= is obfuscated {_show(value)}")
    host, colon, port = value.rpartition(":")
    if colon and _OBFUSCATED_PORT.fullmatch(port) is not None:
        value = host  # an obfuscated port hides only the port; the address is still there
    addr = parse_ip(value)
    if addr is None:
        return Unresolved(f"malformed Forwarded for= {_show(value)}")
    return addr


def _forwarded_elements(header_lines: Sequence[str]) -> tuple[list[str], bool]:
    # RFC 9110 §5.3: several field lines mean the same as one line joined with ",".
    return _split_outside_quotes(",".join(header_lines), _ELEMENT_PART, ",")


def resolve_client_ip(
    peer: str | None,
    header_lines: Sequence[str],
    trusted: CidrSet,
    header: ClientIpHeader,
) -> IpAddress | Unresolved:
    """Return the client's address, or :class:`Unresolved` when it cannot be known.

    Trust assumption: every address in ``trusted`` belongs to a proxy you run, which appends
    the address it received the connection from to ``header`` (X-Forwarded-For, Forwarded)
    or sets ``header`` to it (X-Real-IP). Everything in the header to the left of what those
    proxies wrote came from the client and may be forged. If a trusted proxy passes a
    client's header on untouched, or ``trusted`` contains addresses that others can send
    from, clients can choose their own address: list only your proxies.

    How it decides:

    * The TCP ``peer`` is parsed first. None or not an address (a unix socket): Unresolved.
    * Peer not trusted: the peer is the client; ``header_lines`` are not looked at at all.
    * Peer trusted: the entries of all ``header_lines``, in order, are walked right to left.
      Trusted entries are skipped; the first untrusted one is the client. An entry that does
      not parse (junk, empty, ``for=unknown``, an obfuscated ``for=_x``, an element without
      ``for=``) ends the walk with Unresolved: whatever lies to its left is unvouched text,
      so the walk never skips past it. No entries at all: Unresolved. Every entry trusted:
      the leftmost (the request started on one of our own proxies).

    IPv4-mapped IPv6 counts as IPv4 everywhere; ports, brackets and zone ids are dropped.
    """
    peer_ip = None if peer is None else parse_ip(peer)
    if peer_ip is None:
        shown = "unknown" if peer is None else f"{_show(peer)} is not an IP address"
        return Unresolved(f"peer address {shown}")
    if peer_ip not in trusted:
        return peer_ip

    name = _SPELLING[header]
    if not any(line.strip() for line in header_lines):
        return Unresolved(f"trusted proxy sent no {name}")

    found: IpAddress | None = None
    if header is ClientIpHeader.FORWARDED:
        elements, unterminated = _forwarded_elements(header_lines)
        if unterminated:
            # The right end of the header is inside a quoted string: the rightmost element,
            # the one our proxy wrote, cannot be told apart from what the client wrote.
            return Unresolved(f"malformed {name}: unterminated quoted string")
        for element in reversed(elements):
            result = _forwarded_for(element)
            if isinstance(result, Unresolved):
                return result
            if result not in trusted:
                return result
            found = result
    else:
        if header is ClientIpHeader.X_FORWARDED_FOR:
            # RFC 9110 §5.3: several field lines mean the same as one line joined with ",".
            entries: Sequence[str] = ",".join(header_lines).split(",")
        else:
            entries = header_lines  # X-Real-IP holds one address per line
        for entry in reversed(entries):
            addr = parse_ip(entry)
            if addr is None:
                shown = entry.strip()
                if shown:
                    return Unresolved(f"malformed {name} entry {_show(shown)}")
                return Unresolved(f"empty {name} entry")
            if addr not in trusted:
                return addr
            found = addr
    if found is None:  # unreachable: the header had an entry, so the loop ran
        return Unresolved(f"trusted proxy sent no {name}")
    return found
