"""Pure network decisions: who the client is (client IP) and whether it may pass (IP gate).

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
from sidecar.net.ip_gate import CidrSet, GateVerdict, IpGate

__all__ = [
    "CidrSet",
    "ClientIpHeader",
    "GateVerdict",
    "IpAddress",
    "IpGate",
    "IpNetwork",
    "Unresolved",
    "normalize_ip",
    "parse_ip",
    "resolve_client_ip",
]
