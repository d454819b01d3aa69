"""sidecar.config_checks: settings that switch a protection off are refused unless named in
``acknowledge_insecure``; weaker-than-they-look settings are warned about.

Cases go through ``load_config`` on a real file (what ``check-config``, start-up and reloads
do) and assert what an operator reads: the YAML path, the value, the consequence and the
acknowledgement that would accept it.
"""

from __future__ import annotations

import ipaddress
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import Config, ConfigError, load_config, parse_cidr, parse_config
from sidecar.config_checks import (
    ACKNOWLEDGEMENTS,
    GUESSES_PER_DAY_MAX,
    Severity,
    config_warnings,
    guesses_per_day,
    insecure_settings,
)
from sidecar.net.ip_gate import CidrSet

KEY = Fernet.generate_key().decode()
ENV = types.MappingProxyType({"SIDECAR_SESSION_KEY": KEY, "SIDECAR_DATA_KEY": KEY})
LOOPBACK = "listen: {host: 127.0.0.1}\n"  # no "trusted_proxies is empty" warning


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, *, listen: str = LOOPBACK) -> Config:
    return load_config(write(tmp_path, listen + text), env=ENV)


def refused(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return caught.value.problems


def acknowledging(text: str, *names: str) -> str:
    return text + f"acknowledge_insecure: [{', '.join(names)}]\n"


# --- refused unless acknowledged -----------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    text: str  # YAML added to a valid config
    path: str  # the YAML path the message starts with
    value: str  # the value as the message shows it, right after the path
    consequence: str  # a phrase of what it costs
    acknowledgement: str


HEADER_SPOOF = "any client may write the address it likes in X-Forwarded-For"

REFUSED = [
    pytest.param(
        Refused(
            "mfa: {exempt_paths: [/]}\n",
            "mfa.exempt_paths[0]",
            "'/'",
            "exempts every path: the MFA gate never applies, to anyone",
            "exempt_everything",
        ),
        id="exempt-root",
    ),
    pytest.param(
        Refused(
            "mfa: {exempt_paths: [/logout, /static/, /]}\n",
            "mfa.exempt_paths[2]",
            "'/'",
            "exempts every path",
            "exempt_everything",
        ),
        id="exempt-root-among-others",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: [0.0.0.0/0]}\n",
            "network.trusted_proxies[0]",
            "'0.0.0.0/0'",
            f"covers every IPv4 address: {HEADER_SPOOF}",
            "trust_any_proxy",
        ),
        id="trust-all-ipv4",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['0.0.0.0/0 ']}\n",
            "network.trusted_proxies[0]",
            "'0.0.0.0/0'",
            "covers every IPv4 address",
            "trust_any_proxy",
        ),
        id="trust-all-ipv4-trailing-space",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['::/0']}\n",
            "network.trusted_proxies[0]",
            "'::/0'",
            "covers every IPv6 address: any client may write",
            "trust_any_proxy",
        ),
        id="trust-all-ipv6",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['::ffff:0:0/96']}\n",
            "network.trusted_proxies[0]",
            "'::ffff:0:0/96'",
            "covers every IPv4 address (it matches IPv4 peers as 0.0.0.0/0)",
            "trust_any_proxy",
        ),
        id="trust-all-ipv4-mapped",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['::ffff:0.0.0.0/96']}\n",
            "network.trusted_proxies[0]",
            "'::ffff:0:0/96'",
            "covers every IPv4 address (it matches IPv4 peers as 0.0.0.0/0)",
            "trust_any_proxy",
        ),
        id="trust-all-ipv4-mapped-dotted",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: [10.0.0.0/8, 0.0.0.0/1, 128.0.0.0/1]}\n",
            "network.trusted_proxies",
            "'10.0.0.0/8', '0.0.0.0/1', '128.0.0.0/1'",
            f"together cover every IPv4 address: {HEADER_SPOOF}",
            "trust_any_proxy",
        ),
        id="trust-all-ipv4-in-two-halves",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: [0.0.0.0/1, '::ffff:128.0.0.0/97']}\n",
            "network.trusted_proxies",
            "'0.0.0.0/1', '::ffff:8000:0/97'",
            "together cover every IPv4 address",
            "trust_any_proxy",
        ),
        id="trust-all-ipv4-half-of-it-mapped",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['::/1', '8000::/1']}\n",
            "network.trusted_proxies",
            "'::/1', '8000::/1'",
            "together cover every IPv6 address",
            "trust_any_proxy",
        ),
        id="trust-all-ipv6-in-two-halves",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['0.0.0.0/0'], client_ip_header: x-real-ip}\n"
            "identity: {source: headers}\n",
            "network.trusted_proxies[0]",
            "'0.0.0.0/0'",
            "in X-Real-IP, and the IP lists and the per-address lockout judge that address; it "
            "is also exempt from the per-address connection cap; with identity.source headers, "
            "it may also name any user",
            "trust_any_proxy",
        ),
        id="trust-all-with-identity-headers",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: [64.0.0.0/2]}\n",
            "network.trusted_proxies[0]",
            "'64.0.0.0/2'",
            "is wider than /8 (1/4 of all IPv4 addresses): any client in it may write",
            "trust_broad_proxies",
        ),
        id="trust-a-quarter-of-ipv4",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: [8.0.0.0/7]}\n",
            "network.trusted_proxies[0]",
            "'8.0.0.0/7'",
            "is wider than /8 (1/128 of all IPv4 addresses)",
            "trust_broad_proxies",
        ),
        id="trust-ipv4-slash-7",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['::ffff:0:0/97']}\n",
            "network.trusted_proxies[0]",
            "'::ffff:0:0/97'",
            "is wider than /8 (1/2 of all IPv4 addresses)",
            "trust_broad_proxies",
        ),
        id="trust-half-of-ipv4-mapped",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['2000::/3']}\n",
            "network.trusted_proxies[0]",
            "'2000::/3'",
            "is wider than /8 (1/8 of all IPv6 addresses)",
            "trust_broad_proxies",
        ),
        id="trust-every-public-ipv6",
    ),
    pytest.param(
        Refused(
            "network: {trusted_proxies: ['fc00::/7']}\n",
            "network.trusted_proxies[0]",
            "'fc00::/7'",
            "is wider than /8 (1/128 of all IPv6 addresses)",
            "trust_broad_proxies",
        ),
        id="trust-every-unique-local-ipv6",
    ),
    pytest.param(
        Refused(
            "identity: {admin_roles: []}\n",
            "identity.admin_roles",
            "[]",
            "names no role: nobody is privileged, so MFA policy 'admins' (set here or later on "
            "the Security page) requires MFA of no one",
            "no_admin_roles",
        ),
        id="no-admin-roles",
    ),
    pytest.param(
        Refused(
            "identity: {admin_roles: ['', '']}\n",
            "identity.admin_roles",
            "['', '']",
            "names no role",
            "no_admin_roles",
        ),
        id="only-empty-admin-roles",
    ),
    pytest.param(
        Refused(
            "security: {mfa_policy: admins}\nidentity: {admin_roles: []}\n",
            "identity.admin_roles",
            "[]",
            "requires MFA of no one",
            "no_admin_roles",
        ),
        id="no-admin-roles-with-policy-admins",
    ),
    pytest.param(
        Refused(
            "mfa: {session: {secure: false}}\n",
            "mfa.session.secure",
            "false",
            "while mfa.origin includes 'https://console.example.com': the session cookie is "
            "also sent on plain-HTTP requests to console.example.com, where anyone on the "
            "network path can copy a verified session",
            "insecure_session_cookie",
        ),
        id="cookie-without-secure-on-https",
    ),
    pytest.param(
        Refused(
            "mfa: {rp_id: example.com, session: {secure: false},\n"
            "      origin: ['http://app.example.com', 'https://www.example.com']}\n",
            "mfa.session.secure",
            "false",
            "includes 'https://www.example.com'",
            "insecure_session_cookie",
        ),
        id="cookie-without-secure-one-origin-https",
    ),
]


@pytest.mark.parametrize("case", REFUSED)
def test_a_setting_that_disables_a_protection_is_refused(tmp_path: Path, case: Refused) -> None:
    (problem,) = refused(tmp_path, case.text)
    assert problem.startswith(f"{case.path}: {case.value} ")
    assert case.consequence in problem
    assert problem.endswith(f"; to accept this, add {case.acknowledgement} to acknowledge_insecure")


@pytest.mark.parametrize("case", REFUSED)
def test_an_acknowledged_setting_runs_and_is_reported_as_a_warning(
    tmp_path: Path, case: Refused
) -> None:
    config = load(tmp_path, acknowledging(case.text, case.acknowledgement))
    reminders = [w for w in config_warnings(config) if w.startswith(f"{case.path}: ")]
    assert len(reminders) == 1
    assert reminders[0].startswith(f"{case.path}: {case.value} ")
    assert case.consequence in reminders[0]
    assert reminders[0].endswith(f"(accepted by acknowledge_insecure: {case.acknowledgement})")


@pytest.mark.parametrize("case", REFUSED)
def test_every_other_acknowledgement_does_not_accept_it(tmp_path: Path, case: Refused) -> None:
    others = [name for name in ACKNOWLEDGEMENTS if name != case.acknowledgement]
    (problem,) = refused(tmp_path, acknowledging(case.text, *others))
    assert problem.startswith(f"{case.path}: ")


def test_every_acknowledgement_has_a_refused_case() -> None:
    cases = [param.values[0] for param in REFUSED]
    exercised = {case.acknowledgement for case in cases if isinstance(case, Refused)}
    assert exercised == set(ACKNOWLEDGEMENTS)


def test_refusals_of_several_kinds_are_listed_together(tmp_path: Path) -> None:
    text = "network: {trusted_proxies: ['::/0', 0.0.0.0/3]}\nmfa: {exempt_paths: [/]}\n"
    problems = refused(tmp_path, acknowledging(text, "trust_any_proxy"))
    assert [p.split(":", 1)[0] for p in problems] == [
        "network.trusted_proxies[1]",
        "mfa.exempt_paths[0]",
    ]


def test_acknowledging_one_family_leaves_the_other_refused(tmp_path: Path) -> None:
    text = "network: {trusted_proxies: [0.0.0.0/0, '2000::/3']}\n"
    (problem,) = refused(tmp_path, acknowledging(text, "trust_any_proxy"))
    assert problem.startswith("network.trusted_proxies[1]: '2000::/3' is wider than /8")


# --- look-alikes that do not disable anything ----------------------------------------------

NEVER_MATCHES = (
    "never matches a request: exemptions are compared with canonical, plain paths (no '//', "
    "dot segments, escaped letters or digits, spaces or non-ASCII; README: Exempt paths are "
    "plain paths), so it exempts nothing"
)

HARMLESS = [
    # Exempt entries that look like "/" but match no request (requests are canonical).
    pytest.param("mfa: {exempt_paths: ['//']}\n", ["mfa.exempt_paths[0]"], id="exempt-//"),
    pytest.param("mfa: {exempt_paths: ['/./']}\n", ["mfa.exempt_paths[0]"], id="exempt-/./"),
    pytest.param("mfa: {exempt_paths: ['/.']}\n", ["mfa.exempt_paths[0]"], id="exempt-/."),
    pytest.param("mfa: {exempt_paths: ['/../']}\n", ["mfa.exempt_paths[0]"], id="exempt-/../"),
    pytest.param("mfa: {exempt_paths: ['/ ']}\n", ["mfa.exempt_paths[0]"], id="exempt-slash-space"),
    pytest.param("mfa: {exempt_paths: ['/%2F']}\n", ["mfa.exempt_paths[0]"], id="exempt-/%2F"),
    pytest.param("mfa: {exempt_paths: ['/%2e/']}\n", ["mfa.exempt_paths[0]"], id="exempt-/%2e/"),
    pytest.param("mfa: {exempt_paths: ['/\\']}\n", ["mfa.exempt_paths[0]"], id="exempt-backslash"),
    pytest.param('mfa: {exempt_paths: ["/\\t"]}\n', ["mfa.exempt_paths[0]"], id="exempt-/tab"),
    pytest.param(
        "mfa: {exempt_paths: ['/\uff0e/']}\n", ["mfa.exempt_paths[0]"], id="exempt-fullwidth"
    ),
    pytest.param(
        "mfa: {exempt_paths: ['/static//', /logout]}\n",
        ["mfa.exempt_paths[0]"],
        id="exempt-double-slash-prefix",
    ),
    # The sidecar's own routes are never exempt: covering them costs nothing.
    pytest.param("mfa: {exempt_paths: [/mfa/, /mfa]}\n", [], id="exempt-the-prefix"),
    pytest.param("mfa: {exempt_paths: ['/~user/', '/a%20b']}\n", [], id="exempt-plain-escapes"),
    pytest.param("mfa: {exempt_paths: []}\n", [], id="exempt-nothing"),
    # Trusted networks no wider than the largest private ranges.
    pytest.param(
        "network: {trusted_proxies: [10.0.0.0/8, 'fd00::/8', '::ffff:10.0.0.0/104']}\n",
        [],
        id="trust-private-slash-8",
    ),
    pytest.param("network: {trusted_proxies: ['::/96', '::/8']}\n", [], id="trust-ipv4-compatible"),
    pytest.param(
        "network: {trusted_proxies: [0.0.0.0/8, 1.0.0.0/8, 2.0.0.0/8]}\n",
        [],
        id="trust-three-slash-8s",
    ),
    pytest.param("identity: {admin_roles: [admin]}\n", [], id="one-admin-role"),
    pytest.param("identity: {admin_roles: ['', admin]}\n", [], id="admin-role-and-an-empty-one"),
    pytest.param(
        "mfa: {rp_id: localhost, origin: ['http://localhost:8080', 'https://localhost',\n"
        "      'http://app.localhost'], session: {secure: false}}\n",
        [],
        id="cookie-without-secure-on-localhost",
    ),
    pytest.param(
        "mfa: {rp_id: 127.0.0.1, origin: 'http://127.0.0.1:8080', session: {secure: false}}\n",
        [],
        id="cookie-without-secure-on-127.0.0.1",
    ),
    pytest.param(
        "mfa: {rp_id: intranet, origin: 'http://intranet', session: {secure: false}}\n",
        ["mfa.origin[0]"],
        id="cookie-without-secure-on-plain-http",
    ),
]


@pytest.mark.parametrize(("text", "warned"), HARMLESS)
def test_look_alikes_that_disable_nothing_are_not_refused(
    tmp_path: Path, text: str, warned: list[str]
) -> None:
    config = load(tmp_path, text)
    assert [line.split(": ", 1)[0] for line in config_warnings(config)] == warned


def test_an_exempt_entry_that_never_matches_says_so(tmp_path: Path) -> None:
    config = load(tmp_path, "mfa: {exempt_paths: [/logout, '//']}\n")
    assert config_warnings(config) == [f"mfa.exempt_paths[1]: '//' {NEVER_MATCHES}"]


def test_zero_slash_zero_is_not_a_cidr(tmp_path: Path) -> None:
    # Refused as invalid before any trust is judged: ipaddress wants four octets.
    assert refused(tmp_path, "network: {trusted_proxies: ['0/0']}\n") == [
        "network.trusted_proxies[0]: '0/0' is not a CIDR"
    ]


# --- acknowledge_insecure itself -----------------------------------------------------------

NAMES = ", ".join(ACKNOWLEDGEMENTS)

BAD_ACKNOWLEDGEMENTS = [
    pytest.param(
        "acknowledge_insecure: [trust_any_proxies]\n",
        f"acknowledge_insecure[0]: 'trust_any_proxies' is not an acknowledgement (one of: {NAMES})",
        id="unknown",
    ),
    pytest.param(
        "acknowledge_insecure: ['trust_any_proxy ']\n",
        f"acknowledge_insecure[0]: 'trust_any_proxy ' is not an acknowledgement (one of: {NAMES})",
        id="trailing-space",
    ),
    pytest.param(
        "acknowledge_insecure: [Trust_Any_Proxy]\n",
        f"acknowledge_insecure[0]: 'Trust_Any_Proxy' is not an acknowledgement (one of: {NAMES})",
        id="case",
    ),
    pytest.param(
        "acknowledge_insecure: [1]\n",
        f"acknowledge_insecure[0]: 1 is not an acknowledgement (one of: {NAMES})",
        id="not-a-string",
    ),
    pytest.param(
        "acknowledge_insecure: trust_any_proxy\n",
        "acknowledge_insecure: 'trust_any_proxy': input should be a valid list",
        id="not-a-list",
    ),
    pytest.param(
        "acknowledge_insecure: [no_admin_roles, no_admin_roles]\n",
        "acknowledge_insecure: 'no_admin_roles' is listed twice",
        id="twice",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_ACKNOWLEDGEMENTS)
def test_acknowledgements_are_names_from_the_list(tmp_path: Path, text: str, expected: str) -> None:
    assert refused(tmp_path, text) == [expected]


def test_an_acknowledgement_that_accepts_nothing_is_a_warning(tmp_path: Path) -> None:
    config = load(tmp_path, "acknowledge_insecure: [trust_any_proxy]\n")
    assert config_warnings(config) == [
        "acknowledge_insecure[0]: 'trust_any_proxy' accepts nothing in this file: remove it, "
        "or a later setting of that kind is accepted without being refused"
    ]


def test_the_default_is_no_acknowledgement() -> None:
    assert parse_config({}, env=ENV).acknowledge_insecure == []


# --- warnings ------------------------------------------------------------------------------

WARNINGS = [
    pytest.param(
        "identity: {introspect: {path: '/api/me?fields=role'}}\n",
        LOOPBACK,
        "identity.introspect.path",
        "'/api/me?fields=role' has a query, sent on every introspection with each caller's "
        "credentials",
        id="introspection-query",
    ),
    pytest.param(
        "mfa: {verify_every: 8d}\n",
        LOOPBACK,
        "mfa.verify_every",
        "8d is more than 7d: a browser left signed in, or a copied session cookie, passes the "
        "MFA gate that long",
        id="verify-every-over-7d",
    ),
    pytest.param(
        "mfa: {verify_every: 7d1s}\n",
        LOOPBACK,
        "mfa.verify_every",
        "604801s is more than 7d",
        id="verify-every-just-over-7d",
    ),
    pytest.param(
        "mfa: {verify_every: 59s}\n",
        LOOPBACK,
        "mfa.verify_every",
        "59s is less than 1m: users are sent back to the verify page that often",
        id="verify-every-under-1m",
    ),
    pytest.param(
        "mfa: {verify_every: 1ms}\n",
        LOOPBACK,
        "mfa.verify_every",
        "0.001s is less than 1m",
        id="verify-every-1ms",
    ),
    pytest.param(
        "mfa: {lockout: {max_failures: 21, max_failures_per_address: 50}}\n",
        LOOPBACK,
        "mfa.lockout",
        "max_failures 21 per window 15m, ban 15m: about 2016 wrong codes a day can be tried "
        "against one user (more than 2000; the defaults allow 480): someone holding a user's "
        "console session has an even chance of guessing their 6-digit code within 115 days",
        id="lockout-max-failures-over-20",
    ),
    pytest.param(
        "mfa: {lockout: {window: 59s}}\n",
        LOOPBACK,
        "mfa.lockout",
        "max_failures 5 per window 59s, ban 15m: about 5858 wrong codes a day",
        id="lockout-window-under-1m",
    ),
    pytest.param(
        "mfa: {lockout: {window: 2m}}\n",
        LOOPBACK,
        "mfa.lockout",
        "about 2880 wrong codes a day",
        id="lockout-window-2m",
    ),
    pytest.param(
        "mfa: {lockout: {ban: 30s}}\n",
        LOOPBACK,
        "mfa.lockout",
        "max_failures 5 per window 15m, ban 30s: about 14400 wrong codes a day",
        id="lockout-ban-under-1m",
    ),
    pytest.param(
        "mfa: {lockout: {max_failures: 1, window: 1s, ban: 40s}}\n",
        LOOPBACK,
        "mfa.lockout",
        "about 2160 wrong codes a day",
        id="lockout-one-failure-short-ban",
    ),
    pytest.param(
        "mfa: {lockout: {max_failures: 10, max_failures_per_address: 9}}\n",
        LOOPBACK,
        "mfa.lockout.max_failures_per_address",
        "9 is less than max_failures (10): a client address is locked out before its user is, "
        "so one member's wrong codes lock out everyone behind that address (an office's NAT) "
        "for 15m",
        id="lockout-address-before-user",
    ),
    pytest.param(
        "",
        "listen: {host: 0.0.0.0}\n",
        "network.trusted_proxies",
        "[] while listen.host '0.0.0.0' accepts connections from other hosts: behind a balancer "
        "or ingress every client has the balancer's address, so the IP lists, the per-address "
        "lockout and the per-address connection cap treat all clients as one",
        id="no-trusted-proxies-on-all-interfaces",
    ),
    pytest.param(
        "",
        "listen: {host: '::'}\n",
        "network.trusted_proxies",
        "[] while listen.host '::' accepts connections",
        id="no-trusted-proxies-on-all-ipv6-interfaces",
    ),
    pytest.param(
        "",
        "listen: {host: 10.1.2.3}\n",
        "network.trusted_proxies",
        "[] while listen.host '10.1.2.3' accepts connections",
        id="no-trusted-proxies-on-a-private-address",
    ),
    pytest.param(
        "identity: {source: headers}\n",
        LOOPBACK,
        "identity.source",
        "'headers' while network.trusted_proxies is empty: identity headers are believed only "
        "from trusted proxies, so every request is anonymous and MFA is never required",
        id="identity-headers-from-nobody",
    ),
    pytest.param(
        "identity: {admin_roles: ['admin ', owner]}\n",
        LOOPBACK,
        "identity.admin_roles[0]",
        "'admin ' has spaces around it: roles are compared exactly (ignoring case), so a "
        "console role 'admin' is not privileged",
        id="admin-role-with-a-space",
    ),
    pytest.param(
        "mfa: {rp_id: example.com, origin: 'http://console.example.com'}\n",
        LOOPBACK,
        "mfa.origin[0]",
        "'http://console.example.com' is plain HTTP: console credentials, the sidecar's "
        "session and every code cross the network unencrypted",
        id="plain-http-origin",
    ),
    pytest.param(
        "security: {grace_period: 31d}\n",
        LOOPBACK,
        "security.grace_period",
        "31d is more than 30d: users newly required to use MFA may go without it that long "
        "(with managed_by store this seeds the store once; then the Security page's value "
        "counts)",
        id="grace-period-over-30d",
    ),
    pytest.param(
        "security: {grace_period: 60d, managed_by: config}\n",
        LOOPBACK,
        "security.grace_period",
        "60d is more than 30d: users newly required to use MFA may go without it that long",
        id="grace-period-over-30d-managed-by-config",
    ),
]


@pytest.mark.parametrize(("text", "listen", "path", "phrase"), WARNINGS)
def test_a_weak_setting_is_accepted_with_one_warning_naming_its_path(
    tmp_path: Path, text: str, listen: str, path: str, phrase: str
) -> None:
    (warning,) = config_warnings(load(tmp_path, text, listen=listen))
    assert warning.startswith(f"{path}: ")
    assert phrase in warning


NOT_WARNED = [
    pytest.param("", LOOPBACK, id="defaults-on-loopback"),
    pytest.param("", "listen: {host: '::1'}\n", id="ipv6-loopback"),
    pytest.param("", "listen: {host: localhost}\n", id="localhost"),
    pytest.param("", "listen: {host: 127.0.0.2}\n", id="loopback-range"),
    pytest.param("network: {trusted_proxies: [10.0.0.0/8]}\n", "", id="proxies-listed"),
    pytest.param("mfa: {verify_every: 7d, lockout: {max_failures: 20}}\n", LOOPBACK, id="limits"),
    pytest.param("mfa: {verify_every: 1m, lockout: {window: 3m}}\n", LOOPBACK, id="short-limits"),
    pytest.param("mfa: {lockout: {max_failures: 1, window: 1s}}\n", LOOPBACK, id="one-strike"),
    pytest.param(
        "mfa: {lockout: {max_failures: 7, max_failures_per_address: 7}}\n", LOOPBACK, id="equal"
    ),
    pytest.param("security: {grace_period: 30d}\n", LOOPBACK, id="grace-30d"),
    pytest.param(
        "identity: {source: headers}\nnetwork: {trusted_proxies: [10.0.0.1]}\n",
        LOOPBACK,
        id="identity-headers-from-a-proxy",
    ),
]


@pytest.mark.parametrize(("text", "listen"), NOT_WARNED)
def test_settings_at_the_thresholds_are_not_warned_about(
    tmp_path: Path, text: str, listen: str
) -> None:
    assert config_warnings(load(tmp_path, text, listen=listen)) == []


def test_a_fragment_in_the_introspection_path_is_invalid_whatever_is_acknowledged(
    tmp_path: Path,
) -> None:
    text = acknowledging("identity: {introspect: {path: '/api/me#x'}}\n", *ACKNOWLEDGEMENTS)
    assert refused(tmp_path, text) == [
        "identity.introspect.path: '/api/me#x' has a fragment ('#x'), which is never sent: the "
        "console would be asked for '/api/me'; remove it"
    ]


def test_the_default_lockout_allows_480_guesses_a_day() -> None:
    assert guesses_per_day(5, 900, 900) == 480
    assert guesses_per_day(20, 900, 900) < GUESSES_PER_DAY_MAX < guesses_per_day(21, 900, 900)


def test_findings_list_refusals_first() -> None:
    raw = {"mfa": {"verify_every": "30d", "exempt_paths": ["/"]}}
    with pytest.raises(ConfigError):
        parse_config(raw, env=ENV)
    # The same document, validated without the refusal: what the checks see.
    config = Config.model_validate(
        {
            "mfa": {**raw["mfa"], "session": {"secret_keys": [KEY]}},
            "storage": {"encryption_key": KEY},
        }
    )
    findings = insecure_settings(config)
    assert [(f.severity, f.path) for f in findings] == [
        (Severity.REFUSE, "mfa.exempt_paths[0]"),
        (Severity.WARN, "network.trusted_proxies"),
        (Severity.WARN, "mfa.verify_every"),
    ]
    assert findings[0].acknowledgement == "exempt_everything"


# --- trust is judged as the matcher matches ------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(0, 15), st.integers(0, 4), st.booleans()), min_size=1, max_size=8
    )
)
def test_trust_any_proxy_is_refused_exactly_when_every_ipv4_peer_is_trusted(
    blocks: list[tuple[int, int, bool]],
) -> None:
    """Whatever the spelling (plain or IPv4-mapped, several blocks adding up), the refusal
    agrees with the matcher client-IP resolution uses. Every network here is made of whole
    /4 blocks, so the matcher trusts everyone exactly when it trusts each block's first
    address."""
    texts = []
    for start, prefix, mapped in blocks:
        network = ipaddress.IPv4Network((start << 28, prefix), strict=False)
        texts.append(f"::ffff:{network.network_address}/{96 + prefix}" if mapped else str(network))
    trusted = CidrSet([parse_cidr(text) for text in texts])
    everyone = all(ipaddress.IPv4Address(k << 28) in trusted for k in range(16))
    raw = {
        "network": {"trusted_proxies": texts},
        # Every network here is wider than /8: accept that, so only trust_any_proxy decides.
        "acknowledge_insecure": ["trust_broad_proxies"],
    }
    problems: list[str] = []
    try:
        parse_config(raw, env=ENV)
    except ConfigError as exc:
        problems = exc.problems
    assert bool(problems) == everyone
    assert all("add trust_any_proxy to acknowledge_insecure" in p for p in problems)
