"""Who counts as *one client* for the per-address limits: one rule for every cap that counts
clients (open connections per peer, upstream requests and WebSockets per client).

- IPv4: the address. Everyone behind one NAT address shares it (an office, a carrier NAT).
- IPv6: the /64 the address is in. A /64 is the smallest prefix a network is handed (RFC 6177
  and the SLAAC rules of RFC 4291 §2.5.1: every LAN is a /64), so one host, a cloud VM or a
  home line, holds 2**64 addresses: counted one by one, a single host could open as many
  "clients" as it likes and take every slot. Everyone on one IPv6 LAN shares the /64, as
  everyone behind an IPv4 NAT shares its address.

IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) count as their IPv4 address. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from typing import TypeAlias

from sidecar.net.client_ip import IpAddress, normalize_ip

#: What a per-client counter is keyed by: an IPv4 address or an IPv6 /64.
ClientKey: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Network

_V6_CLIENT_PREFIX = 64
_V6_HOST_BITS = 128 - _V6_CLIENT_PREFIX


def client_key(address: IpAddress) -> ClientKey:
    """The client ``address`` counts as, for every per-client limit (see the module)."""
    address = normalize_ip(address)
    if isinstance(address, ipaddress.IPv4Address):
        return address
    network = int(address) >> _V6_HOST_BITS << _V6_HOST_BITS
    return ipaddress.IPv6Network((network, _V6_CLIENT_PREFIX))
