"""Pure network decisions: who the client is (client IP), whether it may pass (IP gate), and
what the console is told about it (forwarding context).

Nothing here does I/O or imports aiohttp.web; the middlewares feed it values.
"""

from sidecar.net.client_ip import (
    ClientIpHeader,
    IpAddress,
    IpNetwork,
    Unresolved,
    normalize_ip,
    parse_ip,
    resolve_client_ip,
)
from sidecar.net.client_key import ClientKey, client_key
from sidecar.net.forwarding import Forwarding, forwarding_context
from sidecar.net.ip_gate import CidrSet, GateVerdict, IpGate

__all__ = [
    "CidrSet",
    "ClientIpHeader",
    "ClientKey",
    "Forwarding",
    "GateVerdict",
    "IpAddress",
    "IpGate",
    "IpNetwork",
    "Unresolved",
    "client_key",
    "forwarding_context",
    "normalize_ip",
    "parse_ip",
    "resolve_client_ip",
]
