"""forwarding_context: what the console is told about a request, by the proxy and by
identity introspection alike. A client may write anything; only a trusted peer's report of
the scheme counts, and the Host line is taken as sent."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.net import Forwarding, IpAddress, forwarding_context
from sidecar.net.forwarding import Scheme

CLIENT = ipaddress.ip_address("203.0.113.7")


@dataclass(frozen=True)
class Case:
    proto_lines: Sequence[str]
    peer_trusted: bool
    listener: Scheme
    expected: Scheme


SCHEMES = {
    "plain listener, no header": Case((), False, "http", "http"),
    "TLS listener, no header": Case((), False, "https", "https"),
    "untrusted client cannot claim https": Case(("https",), False, "http", "http"),
    "untrusted client cannot claim http on TLS": Case(("http",), False, "https", "https"),
    "trusted TLS balancer says https": Case(("https",), True, "http", "https"),
    "trusted balancer says http on a TLS listener": Case(("http",), True, "https", "http"),
    "rightmost entry of the last line counts": Case(
        ("http", "gopher, https"), True, "http", "https"
    ),
    "client-written entry left of the balancer's is ignored": Case(
        ("https, http",), True, "http", "http"
    ),
    "case and spaces do not matter": Case(("  HTTPS ",), True, "http", "https"),
    "nonsense is ignored": Case(("gopher",), True, "http", "http"),
    "empty entry is ignored": Case(("https,",), True, "http", "http"),
    "trusted peer without a header: the listener's": Case((), True, "https", "https"),
}


@pytest.mark.parametrize("case", SCHEMES.values(), ids=SCHEMES.keys())
def test_scheme(case: Case) -> None:
    forwarding = forwarding_context(
        client_ip=CLIENT,
        host="console.example",
        peer_trusted=case.peer_trusted,
        forwarded_proto=case.proto_lines,
        listener_scheme=case.listener,
    )
    assert forwarding.proto == case.expected


ADDRESSES = {
    "IPv4": (ipaddress.ip_address("203.0.113.7"), "203.0.113.7"),
    "IPv6": (ipaddress.ip_address("2001:db8::1"), "2001:db8::1"),
    "unknown": (None, None),
}


@pytest.mark.parametrize(("address", "expected"), ADDRESSES.values(), ids=ADDRESSES.keys())
def test_client_address_is_the_resolved_one(
    address: IpAddress | None, expected: str | None
) -> None:
    forwarding = forwarding_context(
        client_ip=address,
        host="console.example",
        peer_trusted=False,
        forwarded_proto=(),
        listener_scheme="http",
    )
    assert forwarding.client_ip == expected


HEADER_LINES = {
    "everything known": (
        Forwarding("203.0.113.7", "https", "console.example:8443"),
        [
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "console.example:8443"),
        ],
    ),
    "no Host line (HTTP/1.0), no address": (
        Forwarding(None, "http", None),
        [("X-Forwarded-Proto", "http")],
    ),
}


@pytest.mark.parametrize(("forwarding", "lines"), HEADER_LINES.values(), ids=HEADER_LINES.keys())
def test_header_lines(forwarding: Forwarding, lines: list[tuple[str, str]]) -> None:
    assert forwarding.header_lines() == lines


def test_an_empty_host_line_is_no_host() -> None:
    forwarding = forwarding_context(
        client_ip=CLIENT, host="", peer_trusted=False, forwarded_proto=(), listener_scheme="http"
    )
    assert forwarding.host is None


@given(
    lines=st.lists(st.text(max_size=40), max_size=4),
    trusted=st.booleans(),
    listener=st.sampled_from(["http", "https"]),
)
def test_whatever_a_client_writes_the_scheme_is_http_or_https(
    lines: list[str], trusted: bool, listener: Scheme
) -> None:
    forwarding = forwarding_context(
        client_ip=CLIENT,
        host="h",
        peer_trusted=trusted,
        forwarded_proto=lines,
        listener_scheme=listener,
    )
    assert forwarding.proto in ("http", "https")
    if not trusted:
        assert forwarding.proto == listener
