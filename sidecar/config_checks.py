"""Settings that switch a protection off, and settings that weaken one: decided in one place.

:func:`insecure_settings` reads a validated config and returns findings, each naming the YAML
path, the value and what it costs:

* **refuse**: the setting disables a protection outright: an exempt path that covers every
  path (MFA off everywhere), trusted proxies covering every address of a family (any client
  writes its own address), no privileged role (policy ``admins`` requires no one), a session
  cookie without ``Secure`` on an https origin. :func:`sidecar.config.parse_config` raises
  these as :class:`~sidecar.config.ConfigError` lines (``path: message``), so ``check-config``,
  start-up and reloads refuse the file, unless the top-level ``acknowledge_insecure`` list
  names the finding's acknowledgement (:data:`ACKNOWLEDGEMENTS`). An accepted one becomes a
  warning, repeated at every check, start and reload, so it is never forgotten. A few
  refusals have no acknowledgement: the value cannot mean what was written.
* **warn**: legitimate, but weaker or different than it looks: a long ``verify_every``, a
  lockout that lets guessing through, no trusted proxies on a listener other hosts reach, an
  exempt path that can never match, an acknowledgement that accepts nothing.

:func:`config_warnings` gives the warnings as ``path: message`` lines: ``check-config``
prints each as ``warning: <line>`` on stderr (exit 0), start-up and every reload log each at
warning level (``sidecar.logs.log_config_warnings``).

Pure: a config in, findings out; no I/O and no clock. Matching rules are the ones the
request path uses (``sidecar.paths.is_exempt``; IPv4-mapped networks as
``sidecar.net.ip_gate.CidrSet`` reads them), so a finding describes what the sidecar would
actually do.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from sidecar.paths import canonical_path, is_exempt, is_plain

if TYPE_CHECKING:  # config.py imports this module: only the type is needed here
    from sidecar.config import Config

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Severity(StrEnum):
    REFUSE = "refuse"
    WARN = "warn"


@dataclass(frozen=True, slots=True)
class Finding:
    """One setting worth an operator's attention; ``str()`` is ``path: message``."""

    severity: Severity
    path: str
    message: str
    #: The ``acknowledge_insecure`` name that accepts (or accepted) it, if any.
    acknowledgement: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


EXEMPT_EVERYTHING: Final = "exempt_everything"
TRUST_ANY_PROXY: Final = "trust_any_proxy"
TRUST_BROAD_PROXIES: Final = "trust_broad_proxies"
NO_ADMIN_ROLES: Final = "no_admin_roles"
INSECURE_SESSION_COOKIE: Final = "insecure_session_cookie"

#: Every name ``acknowledge_insecure`` accepts, and what it accepts.
ACKNOWLEDGEMENTS: Final[Mapping[str, str]] = {
    EXEMPT_EVERYTHING: "an mfa.exempt_paths entry covers every path: no MFA anywhere",
    TRUST_ANY_PROXY: "network.trusted_proxies covers every IPv4 or every IPv6 address",
    TRUST_BROAD_PROXIES: "a network.trusted_proxies entry wider than /8",
    NO_ADMIN_ROLES: "identity.admin_roles names no role: nobody is privileged",
    INSECURE_SESSION_COOKIE: "mfa.session.secure: false while an mfa.origin is https",
}

#: Networks wider than this (IPv4 or IPv6) are no proxy fleet: 10.0.0.0/8, the largest
#: private IPv4 range, and fd00::/8, the unique-local IPv6 range in use, are allowed.
BROADEST_TRUSTED_PREFIX: Final = 8
VERIFY_EVERY_MAX: Final = 7 * 86400.0
VERIFY_EVERY_MIN: Final = 60.0
GRACE_PERIOD_MAX: Final = 30 * 86400.0
#: Wrong codes a day one user's lockout may let through (the defaults: 480).
GUESSES_PER_DAY_MAX: Final = 2000
#: A TOTP verification accepts 3 time steps of a 6-digit code (pyotp valid_window=1).
_TOTP_HIT: Final = 3 / 10**6

# The request paths the gate compares are canonical and made of these characters (RFC 3986
# pchar and "/"): an entry with anything else (a space, "?", "#", non-ASCII) never matches.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_MAPPED_BLOCK = ipaddress.IPv6Network("::ffff:0:0/96")
_HEADER_NAMES = {"x-forwarded-for": "X-Forwarded-For", "forwarded": "Forwarded"}


def insecure_settings(config: Config) -> list[Finding]:
    """Every finding for ``config``: refusals first, in key order, then warnings.

    A setting acknowledged in ``acknowledge_insecure`` is returned as a warning that says so;
    an acknowledgement nothing needs is a warning too (it would accept the next such change
    without a word).
    """
    acknowledged = set(config.acknowledge_insecure)
    refused: list[Finding] = []
    warned: list[Finding] = []
    needed: set[str] = set()
    for finding in _findings(config):
        name = finding.acknowledgement
        if finding.severity is Severity.WARN:
            warned.append(finding)
        elif name is None:
            refused.append(finding)
        elif name in acknowledged:
            needed.add(name)
            message = f"{finding.message} (accepted by acknowledge_insecure: {name})"
            warned.append(Finding(Severity.WARN, finding.path, message, name))
        else:
            message = f"{finding.message}; to accept this, add {name} to acknowledge_insecure"
            refused.append(Finding(Severity.REFUSE, finding.path, message, name))
    for index, name in enumerate(config.acknowledge_insecure):
        if name not in needed:
            warned.append(
                _warn(
                    f"acknowledge_insecure[{index}]",
                    f"{name!r} accepts nothing in this file: remove it, or a later setting of "
                    "that kind is accepted without being refused",
                )
            )
    return refused + warned


def refusals(config: Config) -> list[str]:
    """The refused settings as ``path: message`` lines (empty: the config may run)."""
    return [str(f) for f in insecure_settings(config) if f.severity is Severity.REFUSE]


def config_warnings(config: Config) -> list[str]:
    """Every warning about a config as ``path: message`` lines, for ``check-config``, the
    start-up log and every reload: the fail-open settings above, and MFA exemptions that a
    browser session shares (``sidecar.identity.warnings``)."""
    from sidecar.identity.warnings import token_warnings

    fail_open = [str(f) for f in insecure_settings(config) if f.severity is Severity.WARN]
    return fail_open + token_warnings(config)


# --- the checks ----------------------------------------------------------------------------


def _findings(config: Config) -> Iterator[Finding]:
    for check in _CHECKS:
        yield from check(config)


def _refuse(path: str, message: str, acknowledgement: str | None) -> Finding:
    return Finding(Severity.REFUSE, path, message, acknowledgement)


def _warn(path: str, message: str) -> Finding:
    return Finding(Severity.WARN, path, message)


def _exempt_paths(config: Config) -> Iterator[Finding]:
    """An entry matching every path turns the MFA gate off. The sidecar's own routes are
    never exempt (the gate and the identity stage handle the prefix first), so an entry
    covering ``mfa.path_prefix`` costs nothing and is not reported."""
    for index, entry in enumerate(config.mfa.exempt_paths):
        path = f"mfa.exempt_paths[{index}]"
        if is_exempt("/", [entry]) and is_exempt("/any/page", [entry]):
            yield _refuse(
                path,
                f"{entry!r} exempts every path: the MFA gate never applies, to anyone",
                EXEMPT_EVERYTHING,
            )
        elif not _can_match(entry):
            yield _warn(
                path,
                f"{entry!r} never matches a request: exemptions are compared with canonical, "
                "plain paths (no '//', dot segments, escaped letters or digits, spaces or "
                "non-ASCII; README: Exempt paths are plain paths), so it exempts nothing",
            )


def _can_match(entry: str) -> bool:
    """Whether some request path the gate judges can equal or lie below ``entry``."""
    return (
        _PATH_CHARS.fullmatch(entry) is not None
        and canonical_path(entry) == entry
        and is_plain(entry)
    )


def _as_matched(network: IpNetwork) -> IpNetwork:
    """The network as client addresses are matched against it: one inside ``::ffff:0:0/96``
    is the IPv4 network it maps (sidecar.net.ip_gate.CidrSet does the same)."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_BLOCK):
        address = int(network.network_address) - int(_MAPPED_BLOCK.network_address)
        return ipaddress.IPv4Network((address, network.prefixlen - 96))
    return network


def _trusted_proxies(config: Config) -> Iterator[Finding]:
    """Trusted proxies may name the client: covering everyone lets everyone name themselves."""
    header = _HEADER_NAMES.get(config.network.client_ip_header, "X-Real-IP")

    def consequence(who: str) -> str:
        text = (
            f"{who} may write the address it likes in {header}, and the IP lists and the "
            "per-address lockout judge that address; it is also exempt from the per-address "
            "connection cap"
        )
        if config.identity.source == "headers":
            text += "; with identity.source headers, it may also name any user"
        return text

    entries = [(i, n, _as_matched(n)) for i, n in enumerate(config.network.trusted_proxies)]
    for version in (4, 6):
        family = [(i, n, m) for i, n, m in entries if m.version == version]
        everything = [(i, n, m) for i, n, m in family if m.prefixlen == 0]
        for index, written, matched in everything:
            via = f" (it matches IPv4 peers as {matched})" if written != matched else ""
            yield _refuse(
                f"network.trusted_proxies[{index}]",
                f"'{written}' covers every IPv{version} address{via}: {consequence('any client')}",
                TRUST_ANY_PROXY,
            )
        if everything:
            continue
        if _covers_everything([m for _, _, m in family]):
            listed = ", ".join(f"'{n}'" for _, n, _ in family)
            yield _refuse(
                "network.trusted_proxies",
                f"{listed} together cover every IPv{version} address: {consequence('any client')}",
                TRUST_ANY_PROXY,
            )
            continue
        for index, written, matched in family:
            if matched.prefixlen < BROADEST_TRUSTED_PREFIX:
                yield _refuse(
                    f"network.trusted_proxies[{index}]",
                    f"'{written}' is wider than /{BROADEST_TRUSTED_PREFIX} "
                    f"(1/{2**matched.prefixlen} of all IPv{version} addresses): "
                    f"{consequence('any client in it')}; list the proxies' own addresses",
                    TRUST_BROAD_PROXIES,
                )


def _covers_everything(networks: Sequence[IpNetwork]) -> bool:
    """Whether networks of one family together cover all of it (``0.0.0.0/1`` and
    ``128.0.0.0/1`` do): merged, they are one /0."""
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    merged: list[IpNetwork] = [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
    return any(network.prefixlen == 0 for network in merged)


def _listener_without_proxies(config: Config) -> Iterator[Finding]:
    if config.network.trusted_proxies or _is_loopback_host(config.listen.host):
        return
    yield _warn(
        "network.trusted_proxies",
        f"[] while listen.host {config.listen.host!r} accepts connections from other "
        "hosts: behind a balancer or ingress every client has the balancer's address, so the "
        "IP lists, the per-address lockout and the per-address connection cap treat all "
        "clients as one; list the balancer's addresses (nothing to do when clients connect "
        "directly)",
    )


def _identity_headers_from_nobody(config: Config) -> Iterator[Finding]:
    if config.identity.source == "headers" and not config.network.trusted_proxies:
        yield _warn(
            "identity.source",
            "'headers' while network.trusted_proxies is empty: identity headers are believed "
            "only from trusted proxies, so every request is anonymous and MFA is never "
            "required",
        )


def _introspection_path(config: Config) -> Iterator[Finding]:
    path = config.identity.introspect.path
    before_fragment, hash_sign, fragment = path.partition("#")
    if hash_sign:
        # Never sent (RFC 9110 §4.2.4: a fragment is not part of the request target): the
        # console would be asked for another path than the one written.
        yield _refuse(
            "identity.introspect.path",
            f"{path!r} has a fragment ('#{fragment}'), which is never sent: the console would "
            f"be asked for {before_fragment!r}; remove it",
            None,
        )
    if "?" in before_fragment:
        yield _warn(
            "identity.introspect.path",
            f"{path!r} has a query, sent on every introspection with each caller's "
            "credentials: if it carries a credential of its own (an API key, a token), the "
            "console may answer for that credential instead of the caller",
        )


def _admin_roles(config: Config) -> Iterator[Finding]:
    roles = config.identity.admin_roles
    if not any(roles):  # an empty role never matches: consoles' empty roles count as none
        yield _refuse(
            "identity.admin_roles",
            f"{roles!r} names no role: nobody is privileged, so MFA policy 'admins' (set here "
            "or later on the Security page) requires MFA of no one, and no one can use the "
            "Security page or the admin API",
            NO_ADMIN_ROLES,
        )
        return
    for index, role in enumerate(roles):
        if role and role != role.strip():
            yield _warn(
                f"identity.admin_roles[{index}]",
                f"{role!r} has spaces around it: roles are compared exactly (ignoring case), so "
                f"a console role {role.strip()!r} is not privileged",
            )


def _session_cookie(config: Config) -> Iterator[Finding]:
    if config.mfa.session.secure:
        return
    for origin in config.mfa.origin:
        parts = urlsplit(origin)
        if parts.scheme == "https" and not _is_loopback_host(parts.hostname or ""):
            yield _refuse(
                "mfa.session.secure",
                f"false while mfa.origin includes {origin!r}: the session cookie is also sent "
                f"on plain-HTTP requests to {parts.hostname}, where anyone on the network path "
                "can copy a verified session",
                INSECURE_SESSION_COOKIE,
            )
            return


def _plain_http_origins(config: Config) -> Iterator[Finding]:
    for index, origin in enumerate(config.mfa.origin):
        parts = urlsplit(origin)
        if parts.scheme == "http" and not _is_loopback_host(parts.hostname or ""):
            yield _warn(
                f"mfa.origin[{index}]",
                f"{origin!r} is plain HTTP: console credentials, the sidecar's session and "
                "every code cross the network unencrypted, and browsers offer passkeys only "
                "on https (or localhost)",
            )


def _verify_every(config: Config) -> Iterator[Finding]:
    seconds = config.mfa.verify_every
    if seconds > VERIFY_EVERY_MAX:
        yield _warn(
            "mfa.verify_every",
            f"{_duration(seconds)} is more than {_duration(VERIFY_EVERY_MAX)}: a browser left "
            "signed in, or a copied session cookie, passes the MFA gate that long",
        )
    elif seconds < VERIFY_EVERY_MIN:
        yield _warn(
            "mfa.verify_every",
            f"{_duration(seconds)} is less than {_duration(VERIFY_EVERY_MIN)}: users are sent "
            "back to the verify page that often (and the session cookie, with its CSRF token, "
            "expires as fast), so the console is barely usable",
        )


def guesses_per_day(max_failures: int, window: float, ban: float) -> float:
    """Wrong secrets an attacker can try against one user a day under ``mfa.lockout``.

    The window is fixed and a served ban opens a new one (sidecar.store.lockout), so the best
    of two strategies: stay one under the limit each window, or use the whole limit and sit
    out the ban.
    """
    return 86400 * max((max_failures - 1) / window, max_failures / ban)


def _lockout(config: Config) -> Iterator[Finding]:
    lockout = config.mfa.lockout
    per_day = guesses_per_day(lockout.max_failures, lockout.window, lockout.ban)
    if per_day > GUESSES_PER_DAY_MAX:
        half_life = math.log(2) / (per_day * _TOTP_HIT)
        yield _warn(
            "mfa.lockout",
            f"max_failures {lockout.max_failures} per window {_duration(lockout.window)}, ban "
            f"{_duration(lockout.ban)}: about {per_day:.0f} wrong codes a day can be tried "
            f"against one user (more than {GUESSES_PER_DAY_MAX}; the defaults allow 480): "
            "someone holding a user's console session has an even chance of guessing their "
            f"6-digit code within {half_life:.0f} days",
        )
    if lockout.max_failures_per_address < lockout.max_failures:
        yield _warn(
            "mfa.lockout.max_failures_per_address",
            f"{lockout.max_failures_per_address} is less than max_failures "
            f"({lockout.max_failures}): a client address is locked out before its user is, so "
            "one member's wrong codes lock out everyone behind that address (an office's NAT) "
            f"for {_duration(lockout.ban)}",
        )


def _grace_period(config: Config) -> Iterator[Finding]:
    seconds = config.security.grace_period
    if seconds > GRACE_PERIOD_MAX:
        seeded = (
            " (with managed_by store this seeds the store once; then the Security page's "
            "value counts)"
            if config.security.managed_by == "store"
            else ""
        )
        yield _warn(
            "security.grace_period",
            f"{_duration(seconds)} is more than {_duration(GRACE_PERIOD_MAX)}: users newly "
            f"required to use MFA may go without it that long{seeded}",
        )


_CHECKS: Final[tuple[Callable[[Config], Iterator[Finding]], ...]] = (
    _trusted_proxies,
    _listener_without_proxies,
    _identity_headers_from_nobody,
    _introspection_path,
    _admin_roles,
    _grace_period,
    _plain_http_origins,
    _exempt_paths,
    _verify_every,
    _lockout,
    _session_cookie,
)


# --- helpers -------------------------------------------------------------------------------


def _is_loopback_host(host: str) -> bool:
    """``localhost``, ``*.localhost`` (RFC 6761) or a loopback address: only this machine."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _duration(seconds: float) -> str:
    """``7d``, ``12h``, ``15m``, ``90s``, ``0.25s``: as an operator would write it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"
