"""The IP gate (pipeline step 2): denylist first, then allowlist, before any identity work.

Pure and I/O-free. Lookups cost O(log n) in the list size: lists from threat feeds can hold
hundreds of thousands of networks, and every request is checked against them.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from sidecar.decision import Decision
from sidecar.net.client_ip import IpAddress, IpNetwork

# IPv4 and IPv6 share one sorted key space: an IPv4 address is its own 32-bit integer, an
# IPv6 address sits above all of them at 2**32 + its 128-bit integer. One bisect covers both,
# and the many IPv4 keys stay small integers.
_V6_BASE: Final = 1 << 32
# ::ffff:0:0/96, the IPv4-mapped block (RFC 4291 §2.5.5.2), as integers.
_MAPPED_PREFIX: Final = 0xFFFF << 32
_MAPPED_END: Final = _MAPPED_PREFIX + (1 << 32)


def _key(ip: IpAddress) -> int:
    """The address's place in the shared key space; IPv4-mapped IPv6 lands on its IPv4 key."""
    if isinstance(ip, ipaddress.IPv4Address):
        return int(ip)
    value = int(ip)  # the zone id, if any, is not part of the integer
    if _MAPPED_PREFIX <= value < _MAPPED_END:
        return value - _MAPPED_PREFIX
    return _V6_BASE + value


def _span(network: IpNetwork) -> tuple[int, int]:
    """First and last key a network covers; a network inside ::ffff:0:0/96 maps onto IPv4.

    A wider IPv6 network that merely contains the mapped block (``::/0``) keeps its IPv6 keys
    only: it is an IPv6 rule and does not match IPv4 clients.
    """
    if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise TypeError(f"expected an IPv4Network or IPv6Network, got {network!r}")
    # A network's address has its host bits clear, so it lies inside the mapped block only
    # when the whole network does (prefix length 96 or more). The size is computed rather
    # than read from num_addresses, which caches extra objects on the caller's network.
    first = _key(network.network_address)
    return first, first + (1 << (network.max_prefixlen - network.prefixlen)) - 1


class CidrSet:
    """An immutable set of IPv4 and IPv6 networks, looked up in O(log n).

    Promises:

    * ``ip in s`` is True when some configured network contains ``ip``. IPv4-mapped IPv6
      (addresses and networks inside ``::ffff:0:0/96``) counts as the IPv4 it maps; an IPv6
      network such as ``::/0`` that merely contains the mapped block matches IPv6 only.
    * :meth:`matching_rule` returns the most specific configured network containing ``ip``,
      the object as it was passed in (so ``::ffff:10.0.0.0/104`` stays that, although it
      matches as ``10.0.0.0/8``). Two networks that cover the same addresses: the first wins.
    * ``len(s)`` counts distinct networks after normalization: duplicates, and the mapped
      and plain IPv4 spellings of one network, count once.

    How: CIDR blocks either nest or are disjoint, so the key line splits into disjoint
    segments, each owned by the innermost network covering it (or by none). One sorted list
    of segment starts and one bisect answer both questions.
    """

    __slots__ = ("_count", "_rules", "_starts")

    _starts: list[int]
    _rules: list[IpNetwork | None]
    _count: int

    def __init__(self, networks: Iterable[IpNetwork]) -> None:
        by_span: dict[tuple[int, int], IpNetwork] = {}
        for network in networks:
            by_span.setdefault(_span(network), network)

        starts: list[int] = [0]
        rules: list[IpNetwork | None] = [None]

        def begin(at: int, rule: IpNetwork | None) -> None:
            # A segment that would have no addresses is replaced; equal neighbours merge.
            if starts and starts[-1] == at:
                starts.pop()
                rules.pop()
            if not rules or rules[-1] is not rule:
                starts.append(at)
                rules.append(rule)

        # Sorted by start, then widest first: an enclosing network comes before what it holds.
        open_: list[tuple[int, IpNetwork]] = []  # (last key, rule), innermost on top
        # The spans are distinct, so the tuples never compare their third items.
        for first, neg_last, rule in sorted((f, -la, r) for (f, la), r in by_span.items()):
            last = -neg_last
            while open_ and open_[-1][0] < first:
                end, _ = open_.pop()
                begin(end + 1, open_[-1][1] if open_ else None)
            begin(first, rule)
            open_.append((last, rule))
        while open_:
            end, _ = open_.pop()
            begin(end + 1, open_[-1][1] if open_ else None)

        self._starts = starts
        self._rules = rules
        self._count = len(by_span)

    def _segment(self, ip: IpAddress) -> int:
        """Index of the segment holding ``ip``; ``_starts[0] == 0`` so it is never -1."""
        return bisect_right(self._starts, _key(ip)) - 1

    def __contains__(self, ip: IpAddress) -> bool:
        return self._rules[bisect_right(self._starts, _key(ip)) - 1] is not None

    def matching_rule(self, ip: IpAddress) -> IpNetwork | None:
        """The most specific configured network containing ``ip``, or None. O(log n)."""
        return self._rules[self._segment(ip)]

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<CidrSet of {self._count} networks>"


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """What the IP gate decided, and which configured rule decided it (for logs and explain).

    ``rule`` is the denylist network for DENIED_IP and the allowlist network for ALLOWED
    under a non-empty allowlist; None when there is no rule to name.
    """

    decision: Decision
    rule: IpNetwork | None
    list_name: Literal["denylist", "allowlist"] | None


_UNRESTRICTED: Final = GateVerdict(Decision.ALLOWED, None, None)
_NOT_ALLOWLISTED: Final = GateVerdict(Decision.NOT_ALLOWLISTED, None, None)


class IpGate:
    """Denylist, then allowlist, for one client address (DESIGN pipeline step 2).

    * Any denylist match: DENIED_IP, whatever the allowlist says.
    * Else, a non-empty allowlist without a match: NOT_ALLOWLISTED.
    * Else ALLOWED. An empty allowlist means unrestricted.

    Overlaps and duplicates within or across the lists are fine. ``decide`` expects the
    address :func:`~sidecar.net.client_ip.resolve_client_ip` returned; it never consults
    ``is_private`` or any other notion of a "safe" address.
    """

    __slots__ = ("_allow_verdicts", "allowlist", "denylist")

    allowlist: CidrSet
    denylist: CidrSet
    _allow_verdicts: tuple[GateVerdict, ...]

    def __init__(self, allowlist: Iterable[IpNetwork], denylist: Iterable[IpNetwork]) -> None:
        self.allowlist = CidrSet(allowlist)
        self.denylist = CidrSet(denylist)
        # Allowed requests under an allowlist are the common case: one verdict per allowlist
        # segment, built now, so that decide() allocates nothing for them. Denials allocate;
        # a denylist can be large and its hits are rare.
        verdicts: dict[int, GateVerdict] = {}
        if self.allowlist:
            self._allow_verdicts = tuple(
                _NOT_ALLOWLISTED
                if rule is None
                else verdicts.setdefault(id(rule), GateVerdict(Decision.ALLOWED, rule, "allowlist"))
                for rule in self.allowlist._rules
            )
        else:
            self._allow_verdicts = ()

    def decide(self, ip: IpAddress) -> GateVerdict:
        """The gate's verdict for ``ip``. O(log n); allocates only for a denial."""
        # Inlined lookups (see CidrSet._segment): this runs on every request.
        key = _key(ip)
        deny = self.denylist
        denied = deny._rules[bisect_right(deny._starts, key) - 1]
        if denied is not None:
            return GateVerdict(Decision.DENIED_IP, denied, "denylist")
        if not self._allow_verdicts:
            return _UNRESTRICTED
        return self._allow_verdicts[bisect_right(self.allowlist._starts, key) - 1]

    def __repr__(self) -> str:
        return f"<IpGate allowlist={len(self.allowlist)} denylist={len(self.denylist)}>"
