"""What the console is told about a request: who sent it, to which host, over which scheme.

The proxy sends this context with every forwarded request, and identity introspection sends
the same context with its "who is this?" question, so that the console answers both for the
same request (a console may tie a session to a host, a scheme or an address). One function
decides it, :func:`forwarding_context`; the client-IP stage calls it once per request and
both senders read the result.

Security assumptions:

* ``X-Forwarded-For`` is one address: the client the pipeline resolved. Entries left of it in
  a forwarded chain are attacker-written and are never passed on.
* ``X-Forwarded-Proto`` is the listener's own scheme, unless the TCP peer is a trusted proxy
  (one that terminates TLS); then its own report counts: the rightmost entry of its last
  ``X-Forwarded-Proto`` line, when that is ``http`` or ``https``.
* ``X-Forwarded-Host`` is the client's ``Host`` header line, never aiohttp's
  ``request.host``: that follows an absolute-form target (``GET http://evil/ HTTP/1.1``),
  which the client chooses separately from the Host line the console receives. (aiohttp's
  server refuses a request with two Host lines.)

Pure: values in, a value out; no I/O, no aiohttp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sidecar.net.client_ip import IpAddress

Scheme = Literal["http", "https"]


@dataclass(frozen=True, slots=True)
class Forwarding:
    """The forwarding context of one request, as the console receives it.

    ``client_ip``: the resolved client address (None: unknown, no ``X-Forwarded-For``).
    ``proto``: the scheme the client used. ``host``: the client's Host line (None: the
    request had none, as HTTP/1.0 allows; no ``X-Forwarded-Host``).
    """

    client_ip: str | None
    proto: Scheme
    host: str | None

    def header_lines(self) -> list[tuple[str, str]]:
        """The ``X-Forwarded-*`` fields to set on a request to the console, in order."""
        lines: list[tuple[str, str]] = []
        if self.client_ip is not None:
            lines.append(("X-Forwarded-For", self.client_ip))
        lines.append(("X-Forwarded-Proto", self.proto))
        if self.host:
            lines.append(("X-Forwarded-Host", self.host))
        return lines


def forwarding_context(
    *,
    client_ip: IpAddress | None,
    host: str | None,
    peer_trusted: bool,
    forwarded_proto: Sequence[str],
    listener_scheme: Scheme,
) -> Forwarding:
    """The forwarding context of a request; see the module docstring for the rules.

    ``host``: the request's Host header line. ``forwarded_proto``: every
    ``X-Forwarded-Proto`` line the request carries (read only when ``peer_trusted``).
    """
    return Forwarding(
        client_ip=None if client_ip is None else str(client_ip),
        proto=_scheme(peer_trusted, forwarded_proto, listener_scheme),
        host=host or None,
    )


def _scheme(peer_trusted: bool, forwarded_proto: Sequence[str], listener: Scheme) -> Scheme:
    if peer_trusted and forwarded_proto:
        # A trusted proxy appends its own entry: the rightmost one is what it saw.
        reported = forwarded_proto[-1].rsplit(",", 1)[-1].strip().lower()
        if reported == "https":
            return "https"
        if reported == "http":
            return "http"
    return listener
