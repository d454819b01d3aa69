"""Settings that can change while the sidecar runs, swapped as whole immutable values.

The hot path reads ``LiveSettings.network`` once per request; a reload (or, later, a change
made on the Security page) builds a complete new :class:`NetworkPolicy` first and then swaps
the one reference, so a request never sees half of an old and half of a new list.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.config import Config, IpNetwork
from sidecar.net import CidrSet, ClientIpHeader, IpGate


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    trusted_proxies: CidrSet
    client_ip_header: ClientIpHeader
    gate: IpGate
    block_status: int

    @classmethod
    def build(
        cls,
        config: Config,
        allowlist: Iterable[IpNetwork] | None = None,
        denylist: Iterable[IpNetwork] | None = None,
    ) -> NetworkPolicy:
        """From config; the lists default to ``security.ip_allowlist``/``ip_denylist``."""
        security = config.security
        return cls(
            trusted_proxies=CidrSet(config.network.trusted_proxies),
            client_ip_header=ClientIpHeader(config.network.client_ip_header),
            gate=IpGate(
                allowlist=security.ip_allowlist if allowlist is None else allowlist,
                denylist=security.ip_denylist if denylist is None else denylist,
            ),
            block_status=config.network.block_status,
        )


class LiveSettings:
    """One per app: what a reload may replace. Each attribute is an immutable value (or a
    provider) replaced whole; request handling reads each one once per request."""

    def __init__(self, network: NetworkPolicy, config: Config) -> None:
        self.network = network
        #: The running configuration (a reload swaps in a new one).
        self.config = config
        #: False until the store-held lists were loaded once; until then requests are
        #: refused rather than judged by possibly stale YAML lists.
        self.loaded = False

    def swap_network(self, network: NetworkPolicy) -> None:
        self.network = network
