"""sidecar.config: what operators see when they write a config file.

Most cases go through ``load_config`` on a real file, because that is what ``sidecar run`` and
``sidecar check-config`` do; the messages are asserted exactly, since they are the interface.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from sidecar.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
SESSION_KEY = Fernet.generate_key().decode()
DATA_KEY = Fernet.generate_key().decode()
ENV = types.MappingProxyType({"SIDECAR_SESSION_KEY": SESSION_KEY, "SIDECAR_DATA_KEY": DATA_KEY})


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "sidecar.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path, env: typing.Mapping[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- one bad value, one exact message ------------------------------------------------------

BAD_VALUES = [
    pytest.param(
        "listen: {port: eighty}",
        "listen.port: 'eighty': input should be a valid integer, "
        "unable to parse string as an integer",
        id="port-not-a-number",
    ),
    pytest.param(
        "listen: {port: 70000}",
        "listen.port: 70000: input should be less than or equal to 65535",
        id="port-out-of-range",
    ),
    pytest.param(
        "workers: 0",
        "workers: 0: input should be greater than or equal to 1",
        id="workers-zero",
    ),
    pytest.param(
        "mfa: {enforce_on_tokens: [1]}",
        "mfa.enforce_on_tokens: [1]: input should be a valid boolean",
        id="bool-given-a-list",
    ),
    pytest.param(
        "security: {ip_allowlist: [10.0.0.0/8, 192.0.2.1, '::1', 10.0.0.0/33]}",
        "security.ip_allowlist[3]: '10.0.0.0/33' is not a CIDR",
        id="cidr-prefix-too-long",
    ),
    pytest.param(
        "security: {ip_denylist: [banana]}",
        "security.ip_denylist[0]: 'banana' is not a CIDR",
        id="cidr-garbage",
    ),
    pytest.param(
        "network: {trusted_proxies: [10.0.0.1/8]}",
        "network.trusted_proxies[0]: '10.0.0.1/8' has host bits set "
        "(did you mean the network address?)",
        id="cidr-host-bits-set",
    ),
    pytest.param(
        "security: {ip_allowlist: [167772160]}",
        "security.ip_allowlist[0]: 167772160 is not a CIDR (write it as a quoted string)",
        id="cidr-given-an-integer",
    ),
    pytest.param(
        "security: {ip_allowlist: ['2001:db8::/129']}",
        "security.ip_allowlist[0]: '2001:db8::/129' is not a CIDR",
        id="cidr-v6-prefix-too-long",
    ),
    pytest.param("lisen: {port: 80}", "lisen: unknown key", id="unknown-top-level-key"),
    pytest.param("listen: {prot: 80}", "listen.prot: unknown key", id="unknown-nested-key"),
    pytest.param(
        "mfa: {lockout: {max_failure: 3}}",
        "mfa.lockout.max_failure: unknown key",
        id="unknown-deeply-nested-key",
    ),
    pytest.param("'a[1]': 2", "a[1]: unknown key", id="unknown-key-that-looks-like-an-index"),
    pytest.param(
        "upstream: {url: 'http://${CONSOLE_HOST}:3000'}",
        "upstream.url: environment variable CONSOLE_HOST is not set",
        id="missing-env-var",
    ),
    pytest.param(
        "upstream: {url: 'http://${CONSOLE_HOST}:${CONSOLE_PORT}'}",
        "upstream.url: environment variables CONSOLE_HOST, CONSOLE_PORT are not set",
        id="missing-env-vars",
    ),
    pytest.param(
        "security: {grace_period: 3 days}",
        "security.grace_period: '3 days' is not a duration (use e.g. 90s, 15m, 72h, 7d)",
        id="duration-garbage",
    ),
    pytest.param(
        "security: {grace_period: -5}",
        "security.grace_period: -5 must not be negative",
        id="duration-negative",
    ),
    pytest.param(
        "security: {grace_period: .inf}",
        "security.grace_period: inf is too long a duration (at most 3650d)",
        id="duration-infinite",
    ),
    pytest.param(
        "security: {grace_period: .nan}",
        "security.grace_period: nan is not a duration (use e.g. 90s, 15m, 72h, 7d)",
        id="duration-nan",
    ),
    pytest.param(
        "upstream: {read_timeout: 0s}",
        "upstream.read_timeout: '0s' must be more than zero",
        id="timeout-zero",
    ),
    pytest.param(
        "mfa: {lockout: {window: 0}}",
        "mfa.lockout.window: 0 must be more than zero",
        id="lockout-window-zero",
    ),
    pytest.param(
        "listen: {max_body_size: lots}",
        "listen.max_body_size: 'lots' is not a size (use e.g. 512KiB, 64MiB, 1GiB or bytes)",
        id="size-garbage",
    ),
    pytest.param(
        "listen: {max_body_size: 0}",
        "listen.max_body_size: 0 must be positive",
        id="size-zero",
    ),
    pytest.param(
        "listen: {header_timeout: 0}",
        "listen.header_timeout: 0 must be more than zero",
        id="header-timeout-zero",
    ),
    pytest.param(
        "listen: {max_connections: 0}",
        "listen.max_connections: 0: input should be greater than or equal to 1",
        id="max-connections-zero",
    ),
    pytest.param(
        "listen: {max_connections_per_address: many}",
        "listen.max_connections_per_address: 'many': input should be a valid integer, "
        "unable to parse string as an integer",
        id="max-connections-per-address-not-a-number",
    ),
    pytest.param(
        "upstream: {websocket_max_message: 2GiB}",
        "upstream.websocket_max_message: '2GiB' must be at most 1GiB",
        id="websocket-message-over-1gib",
    ),
    pytest.param(
        "upstream: {websocket_max_message: 0}",
        "upstream.websocket_max_message: 0 must be positive",
        id="websocket-message-zero",
    ),
    pytest.param(
        "upstream: {url: 'ftp://console.internal'}",
        "upstream.url: 'ftp://console.internal' is not an http:// or https:// URL with a host",
        id="upstream-url-scheme",
    ),
    pytest.param(
        "upstream: {url: 'http://console.internal/?x=1'}",
        "upstream.url: 'http://console.internal/?x=1' must not contain credentials, "
        "a query or a fragment",
        id="upstream-url-query",
    ),
    pytest.param(
        "upstream: {url: 'http://console.internal:99999'}",
        "upstream.url: 'http://console.internal:99999' has an invalid port",
        id="upstream-url-port",
    ),
    pytest.param(
        "storage: {url: 'mysql://db/sidecar'}",
        "storage.url: 'mysql://db/sidecar' must be sqlite:///path or postgresql://user@host/db",
        id="storage-url-scheme",
    ),
    pytest.param(
        "mfa: {rp_id: example.org}",
        "mfa: rp_id 'example.org' is not the host of origin 'https://console.example.com'",
        id="rp-id-not-the-origin-host",
    ),
    pytest.param(
        "mfa: {rp_id: example.com, origin: 'https://evilexample.com'}",
        "mfa: rp_id 'example.com' is not the host of origin 'https://evilexample.com'",
        id="rp-id-suffix-without-a-dot",
    ),
    pytest.param(
        "mfa: {origin: 'https://console.example.com/app'}",
        "mfa.origin: 'https://console.example.com/app' must be an origin without a path",
        id="origin-with-path",
    ),
    pytest.param(
        "network: {client_ip_header: X-Client-IP}",
        "network.client_ip_header: 'x-client-ip': "
        "input should be 'x-forwarded-for', 'forwarded' or 'x-real-ip'",
        id="client-ip-header-unknown",
    ),
    pytest.param(
        "security: {mfa_policy: everyone}",
        "security.mfa_policy: 'everyone': input should be 'optional', 'admins' or 'all'",
        id="mfa-policy-unknown",
    ),
    pytest.param(
        "identity: {source: jwt}",
        "identity: source is jwt but neither jwt.key nor jwt.key_file is set",
        id="jwt-without-key",
    ),
    pytest.param(
        "listen: {tls: {cert_file: /nonexistent/tls.crt, key_file: /nonexistent/tls.key}}",
        "listen.tls: cert_file '/nonexistent/tls.crt' does not exist or is not a file",
        id="tls-file-missing",
    ),
    pytest.param(
        "mfa: {path_prefix: /mfa/}",
        "mfa.path_prefix: '/mfa/' must look like /mfa (a path without a trailing slash)",
        id="path-prefix-trailing-slash",
    ),
    pytest.param(
        "1: one",
        "1: 1: keys should be strings",
        id="non-string-key",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_VALUES)
def test_a_bad_value_gets_one_message_naming_path_and_value(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert problems(write(tmp_path, text)) == [expected]


SECRETS = [
    pytest.param(
        "storage: {encryption_key: hunter2-hunter2}",
        "storage.encryption_key: is not a valid key (generate one with `sidecar keys generate`)",
        id="data-key",
    ),
    pytest.param(
        "mfa: {session: {secret_keys: [hunter2-hunter2]}}",
        "mfa.session.secret_keys[0]: is not a valid key "
        "(generate one with `sidecar keys generate`)",
        id="session-key",
    ),
    pytest.param(
        "mfa: {session: {secret_keys: hunter2-hunter2}}",
        "mfa.session.secret_keys: input should be a valid list",
        id="session-keys-not-a-list",
    ),
    pytest.param(
        "identity: {jwt: {api_token: {claim: token_use}}}",
        "identity.jwt.api_token.value: is required",
        id="api-token-rule-without-value",
    ),
    pytest.param(
        "identity: {introspect: {api_token: {field: '', value: api_token}}}",
        "identity.introspect.api_token.field: '' must not be empty",
        id="api-token-rule-empty-field",
    ),
    pytest.param(
        "identity: {jwt: {api_token: {claim: token_use, value: true}}}",
        "identity.jwt.api_token.value: True: input should be a valid string",
        id="api-token-rule-value-not-a-string",
    ),
    pytest.param(
        "identity: {jwt: {key: [hunter2-hunter2]}}",
        "identity.jwt.key: input should be a valid string",
        id="jwt-key",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SECRETS)
def test_a_bad_secret_is_named_but_never_shown(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(write(tmp_path, text))
    assert found == [expected]
    assert "hunter2" not in "\n".join(found)


def test_a_long_bad_value_is_cut_short(tmp_path: Path) -> None:
    (found,) = problems(write(tmp_path, f"listen: {{max_body_size: {'x' * 500}}}"))
    assert found.startswith("listen.max_body_size: 'xxxxx")
    assert "..." in found
    assert len(found) < 200


# --- the file itself -----------------------------------------------------------------------


def test_missing_secrets_are_required_with_a_hint(tmp_path: Path) -> None:
    assert problems(write(tmp_path, ""), env={}) == [
        "mfa.session.secret_keys: is required "
        "(set it in the YAML or SIDECAR_SESSION_KEY; `sidecar keys generate` makes one)",
        "storage.encryption_key: is required "
        "(set it in the YAML or SIDECAR_DATA_KEY; `sidecar keys generate` makes one)",
    ]


def test_an_empty_file_with_secrets_in_the_environment_gives_the_defaults(
    tmp_path: Path,
) -> None:
    config = load_config(write(tmp_path, "# nothing but a comment\n"), env=ENV)
    assert config.listen.port == 8080
    assert config.upstream.url == "http://127.0.0.1:3000"


FILE_PROBLEMS = [
    pytest.param(
        "listen:\n  host: 0.0.0.0\n  port: 80\n  port: 8080\n",
        "{path}:4:3: invalid YAML: duplicate key 'port'",
        id="duplicate-key",
    ),
    pytest.param(
        "security:\n  ip_denylist: []\nsecurity:\n  ip_allowlist: []\n",
        "{path}:3:1: invalid YAML: duplicate key 'security'",
        id="duplicate-section",
    ),
    pytest.param(
        "listen:\n\tport: 8080\n",
        "{path}:2:1: invalid YAML: found character '\\t' that cannot start any token",
        id="tab-indentation",
    ),
    pytest.param(
        "security:\n  ip_allowlist: [10.0.0.0/8\n",
        "{path}:3:1: invalid YAML: expected ',' or ']', but got '<stream end>'",
        id="unclosed-bracket",
    ),
    pytest.param(
        "audit:\n  file: 'a\x07b'\n",
        "{path}:2:11: invalid YAML: character '\\x07' is not allowed",
        id="control-character",
    ),
    pytest.param(
        "? [a, b]\n: c\n",
        "{path}:1:3: invalid YAML: a key must be a plain value, not a list or mapping",
        id="list-as-key",
    ),
    pytest.param(
        "[" * 5000 + "]" * 5000 + "\n",
        "{path}: invalid YAML: nested too deeply",
        id="nested-too-deeply",
    ),
    pytest.param(
        "- listen\n- mfa\n",
        "(top level): must be a mapping of sections such as listen:, mfa:",
        id="a-list",
    ),
    pytest.param(
        "just words\n",
        "(top level): must be a mapping of sections such as listen:, mfa:",
        id="a-scalar",
    ),
    pytest.param(
        b"audit: {file: caf\xe9.log}\n",
        "{path}: is not UTF-8 text",
        id="latin-1",
    ),
]


@pytest.mark.parametrize(("text", "expected"), FILE_PROBLEMS)
def test_a_broken_file_is_reported_with_its_location(
    tmp_path: Path, text: str | bytes, expected: str
) -> None:
    path = write(tmp_path, text)
    assert problems(path) == [expected.format(path=path)]


def test_a_nonexistent_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems(path) == [f"{path}: cannot read: No such file or directory"]


def test_a_directory(tmp_path: Path) -> None:
    assert problems(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file"
)
def test_an_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 1\n")
    path.chmod(0)
    assert problems(path) == [f"{path}: cannot read: Permission denied"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
listen:
  port: eighty
  prot: 8080
security:
  ip_allowlist: [10.0.0.0/8, 10.0.0.0/33]
  grace_period: soon
""",
    )
    assert problems(path) == [
        "listen.port: 'eighty': input should be a valid integer, "
        "unable to parse string as an integer",
        "listen.prot: unknown key",
        "security.grace_period: 'soon' is not a duration (use e.g. 90s, 15m, 72h, 7d)",
        "security.ip_allowlist[1]: '10.0.0.0/33' is not a CIDR",
    ]


# --- durations and sizes -------------------------------------------------------------------

DURATIONS = [
    pytest.param("90s", 90.0, id="seconds"),
    pytest.param("15m", 900.0, id="minutes"),
    pytest.param("72h", 259_200.0, id="hours"),
    pytest.param("7d", 604_800.0, id="days"),
    pytest.param("1h30m", 5_400.0, id="compound"),
    pytest.param("250ms", 0.25, id="milliseconds"),
    pytest.param("1.5h", 5_400.0, id="fraction"),
    pytest.param(" 15M ", 900.0, id="spaces-and-capitals"),
    pytest.param(90, 90.0, id="bare-int"),
    pytest.param(0.5, 0.5, id="bare-float"),
    pytest.param("90", 90.0, id="number-as-text"),
    pytest.param(0, 0.0, id="zero"),
]


@pytest.mark.parametrize(("value", "seconds"), DURATIONS)
def test_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


NOT_DURATIONS = [
    pytest.param("-5s", id="negative-text"),
    pytest.param(-1, id="negative-number"),
    pytest.param("", id="empty"),
    pytest.param("s", id="unit-only"),
    pytest.param("5 s", id="space-before-unit"),
    pytest.param("1h 30m", id="space-between-parts"),
    pytest.param("5x", id="unknown-unit"),
    pytest.param("1e3s", id="exponent"),
    pytest.param("\u0665s", id="non-ascii-digit"),
    pytest.param(True, id="bool"),
    pytest.param(None, id="null"),
    pytest.param([5], id="list"),
    pytest.param(math.inf, id="infinite"),
    pytest.param(math.nan, id="nan"),
    pytest.param(10**400, id="int-too-big-for-a-float"),
    pytest.param("9" * 400 + "s", id="text-too-big-for-a-float"),
]


@pytest.mark.parametrize("value", NOT_DURATIONS)
def test_not_a_duration(value: object) -> None:
    with pytest.raises(PydanticCustomError):
        parse_duration(value)


SIZES = [
    pytest.param("512KiB", 512 * 1024, id="kibibytes"),
    pytest.param("64MiB", 64 * 1024**2, id="mebibytes"),
    pytest.param("1GiB", 1024**3, id="gibibytes"),
    pytest.param("10MB", 10_000_000, id="megabytes"),
    pytest.param("2kb", 2_000, id="lower-case"),
    pytest.param("512 KiB", 512 * 1024, id="space-before-unit"),
    pytest.param(1000, 1000, id="bare-int"),
    pytest.param("1000", 1000, id="number-as-text"),
    pytest.param("1000B", 1000, id="bytes-unit"),
]


@pytest.mark.parametrize(("value", "size"), SIZES)
def test_size(value: object, size: int) -> None:
    assert parse_size(value) == size


NOT_SIZES = [
    pytest.param(0, id="zero"),
    pytest.param("0KiB", id="zero-with-unit"),
    pytest.param(-1, id="negative"),
    pytest.param("-1KiB", id="negative-text"),
    pytest.param("1.5MiB", id="fraction"),
    pytest.param(1.5, id="float"),
    pytest.param("64MiBs", id="unknown-unit"),
    pytest.param("", id="empty"),
    pytest.param(True, id="bool"),
    pytest.param(None, id="null"),
    pytest.param("\u0665KiB", id="non-ascii-digit"),
    pytest.param("9" * 5000, id="more-digits-than-int-accepts"),
]


@pytest.mark.parametrize("value", NOT_SIZES)
def test_not_a_size(value: object) -> None:
    with pytest.raises(PydanticCustomError):
        parse_size(value)


def test_zero_is_a_grace_period_but_not_a_timeout(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "security: {grace_period: 0}\n"), env=ENV)
    assert config.security.grace_period == 0
    assert problems(write(tmp_path, "upstream: {connect_timeout: 0}\n")) == [
        "upstream.connect_timeout: 0 must be more than zero"
    ]


_UNITS_TEXT = st.text(alphabet="0123456789.smhdkKMGiBb -\u0665", max_size=12)


@given(st.one_of(st.text(), _UNITS_TEXT))
def test_parse_duration_fails_only_with_its_own_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except PydanticCustomError:
        return
    assert math.isfinite(seconds)
    assert seconds >= 0


@given(st.one_of(st.text(), _UNITS_TEXT))
def test_parse_size_fails_only_with_its_own_error(text: str) -> None:
    try:
        size = parse_size(text)
    except PydanticCustomError:
        return
    assert size > 0


# --- environment, secrets, immutability, address lists -------------------------------------


def test_env_references_expand_inside_strings_and_lists(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'upstream: {url: "http://${CONSOLE_HOST}:${CONSOLE_PORT}"}\n'
        "mfa:\n"
        '  exempt_paths: ["${LOGOUT_PATH}", /static/]\n'
        '  session: {secret_keys: ["${NEW_KEY}", "${SIDECAR_SESSION_KEY}"]}\n'
        f'audit: {{file: "{tmp_path}/$HOME-not-a-reference.log"}}\n',
    )
    new_key = Fernet.generate_key().decode()
    env = {
        **ENV,
        "CONSOLE_HOST": "console.internal",
        "CONSOLE_PORT": "3000",
        "LOGOUT_PATH": "/signout",
        "NEW_KEY": new_key,
    }
    config = load_config(path, env=env)
    assert config.upstream.url == "http://console.internal:3000"
    assert config.mfa.exempt_paths == ["/signout", "/static/"]
    assert config.mfa.session.secret_keys == [new_key, SESSION_KEY]
    assert config.audit.file == f"{tmp_path}/$HOME-not-a-reference.log"


def test_an_expanded_value_is_not_expanded_again(tmp_path: Path) -> None:
    path = write(tmp_path, 'audit: {file: "${AUDIT_FILE}"}\n')
    config = load_config(path, env={**ENV, "AUDIT_FILE": "${SIDECAR_DATA_KEY}"})
    assert config.audit.file == "${SIDECAR_DATA_KEY}"


def test_a_missing_env_var_in_a_list_names_the_item(tmp_path: Path) -> None:
    path = write(tmp_path, 'mfa: {session: {secret_keys: ["${SIDECAR_SESSION_KEY}", "${OLD}"]}}')
    assert problems(path) == ["mfa.session.secret_keys[1]: environment variable OLD is not set"]


def test_secrets_come_from_the_environment_when_omitted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "workers: 2\n"), env=ENV)
    assert config.mfa.session.secret_keys == [SESSION_KEY]
    assert config.storage.encryption_key == DATA_KEY


def test_secrets_in_the_file_win_over_the_environment(tmp_path: Path) -> None:
    own = Fernet.generate_key().decode()
    path = write(
        tmp_path, f"mfa: {{session: {{secret_keys: [{own}]}}}}\nstorage: {{encryption_key: {own}}}"
    )
    config = load_config(path, env=ENV)
    assert config.mfa.session.secret_keys == [own]
    assert config.storage.encryption_key == own


def test_the_config_is_frozen() -> None:
    config = parse_config({}, env=ENV)
    with pytest.raises(ValidationError, match="frozen"):
        config.workers = 4
    with pytest.raises(ValidationError, match="frozen"):
        config.security.mfa_policy = "all"
    assert config.workers == 1
    assert config.security.mfa_policy == "optional"


def test_addresses_become_networks(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
network:
  trusted_proxies: [10.0.0.0/8, "fd00::/8"]
security:
  ip_allowlist: [192.0.2.7, "2001:db8::1", "2001:db8:1::/48", " 198.51.100.0/24 "]
  ip_denylist: ["::ffff:0:0/96"]
""",
    )
    config = load_config(path, env=ENV)
    net = ipaddress.ip_network
    assert config.network.trusted_proxies == [net("10.0.0.0/8"), net("fd00::/8")]
    assert config.security.ip_allowlist == [
        net("192.0.2.7/32"),
        net("2001:db8::1/128"),
        net("2001:db8:1::/48"),
        net("198.51.100.0/24"),
    ]
    assert config.security.ip_denylist == [net("::ffff:0:0/96")]


def test_origin_may_be_one_string_or_a_list(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mfa: {rp_id: example.com, origin: ['https://example.com/', 'https://a.example.com']}",
    )
    config = load_config(path, env=ENV)
    assert config.mfa.origin == ["https://example.com", "https://a.example.com"]


# --- config.example.yaml -------------------------------------------------------------------


def _example_env() -> dict[str, str]:
    return {
        "SIDECAR_SESSION_KEY": Fernet.generate_key().decode(),
        "SIDECAR_DATA_KEY": Fernet.generate_key().decode(),
    }


def test_the_example_is_valid_and_shows_the_defaults() -> None:
    env = _example_env()
    config = load_config(EXAMPLE, env=env)
    assert config.mfa.session.secret_keys == [env["SIDECAR_SESSION_KEY"]]
    assert config.storage.encryption_key == env["SIDECAR_DATA_KEY"]
    # Every value it shows is the default: the comments promise as much.
    assert config == parse_config({}, env=env)


def test_the_example_refers_to_the_secrets_in_the_environment() -> None:
    assert problems(EXAMPLE, env={}) == [
        "mfa.session.secret_keys[0]: environment variable SIDECAR_SESSION_KEY is not set",
        "storage.encryption_key: environment variable SIDECAR_DATA_KEY is not set",
    ]


def _section_model(annotation: object) -> type[BaseModel] | None:
    """The model behind ``Model`` or ``Model | None``, else None."""
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _missing_keys(
    model: type[BaseModel], data: object, text: str, path: str
) -> typing.Iterator[str]:
    """Fields of ``model`` that the example leaves out. A section set to null (``tls: null``)
    must show its keys in a commented-out block instead."""
    if not isinstance(data, dict):
        for name in model.model_fields:
            if not re.search(rf"^\s*#\s*{name}:", text, re.MULTILINE):
                yield f"{path}.{name} (in a comment)"
        return
    present = [key for key in data if key in model.model_fields]
    if present != [name for name in model.model_fields if name in data]:
        yield f"{path or '(top level)'}: keys out of order: {present}"
    for name, field in model.model_fields.items():
        where = f"{path}.{name}" if path else name
        if name not in data:
            yield where
            continue
        section = _section_model(field.annotation)
        if section is not None:
            yield from _missing_keys(section, data[name], text, where)


def test_the_example_shows_every_key_in_model_order() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    data: Any = yaml.safe_load(text)
    assert list(_missing_keys(Config, data, text, "")) == []


def test_the_example_has_a_comment_for_every_key() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*[a-z_]+:", line):
            above = lines[number - 1].strip() if number else ""
            assert "#" in line or above.startswith("#"), f"line {number + 1}: {line!r}"


def test_an_unwritable_audit_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, f'audit: {{file: "{tmp_path}/missing-dir/audit.jsonl"}}\n')
    with pytest.raises(ConfigError) as refused:
        load_config(path, env=ENV)
    (problem,) = refused.value.problems
    assert problem.startswith("audit.file: '")
    assert problem.endswith(f"cannot be written: directory '{tmp_path}/missing-dir' does not exist")


def test_extra_credential_headers_are_kept_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, "identity: {introspect: {headers: [X-Api-Key, Private-Token]}}")
    assert load_config(path, env=ENV).identity.introspect.headers == ["X-Api-Key", "Private-Token"]


CREDENTIAL_HEADERS = [
    pytest.param(
        "[Cookie, authorization]",
        [
            "identity.introspect.headers[0]: 'Cookie' is always sent to introspection already",
            "identity.introspect.headers[1]: 'authorization' is always sent to introspection "
            "already",
        ],
        id="credentials-already",
    ),
    pytest.param(
        "[Host]",
        [
            "identity.introspect.headers[0]: 'Host' is the Host header, which is context, not a "
            "credential"
        ],
        id="host",
    ),
    pytest.param(
        "[X_Api_Key]",
        [
            "identity.introspect.headers[0]: 'X_Api_Key' contains '_': the proxy drops such "
            "headers, so the console would never see it"
        ],
        id="underscore",
    ),
    pytest.param(
        "['X-Api-Key ', 'X-Api-Key:', 'X-Ápi']",
        [
            "identity.introspect.headers[0]: 'X-Api-Key ' is not an HTTP header name",
            "identity.introspect.headers[1]: 'X-Api-Key:' is not an HTTP header name",
            "identity.introspect.headers[2]: 'X-Ápi' is not an HTTP header name",
        ],
        id="not-a-token",
    ),
    pytest.param(
        "[Connection, Keep-Alive, Proxy-Token, Sec-Fetch-Site]",
        [
            f"identity.introspect.headers[{i}]: '{name}' is a hop-by-hop or reserved header"
            for i, name in enumerate(["Connection", "Keep-Alive", "Proxy-Token", "Sec-Fetch-Site"])
        ],
        id="hop-by-hop-and-reserved",
    ),
    pytest.param(
        "[X-Forwarded-Host, Forwarded, X-Real-IP, X-Original-URL]",
        [
            f"identity.introspect.headers[{i}]: '{name}' is a forwarding header the sidecar "
            "sets itself"
            for i, name in enumerate(
                ["X-Forwarded-Host", "Forwarded", "X-Real-IP", "X-Original-URL"]
            )
        ],
        id="forwarding",
    ),
    pytest.param(
        "[X-Forwarded-User, Remote-User, X-Auth-Request-Access-Token]",
        [
            f"identity.introspect.headers[{i}]: '{name}' is an identity header only a trusted "
            "proxy may send"
            for i, name in enumerate(
                ["X-Forwarded-User", "Remote-User", "X-Auth-Request-Access-Token"]
            )
        ],
        id="identity",
    ),
    pytest.param(
        "[Accept, Content-Length]",
        [
            f"identity.introspect.headers[{i}]: '{name}' is set by the sidecar on the "
            "introspection request"
            for i, name in enumerate(["Accept", "Content-Length"])
        ],
        id="set-by-introspection",
    ),
    pytest.param(
        "[X-Api-Key, x-api-KEY]",
        ["identity.introspect.headers: 'x-api-KEY' is listed twice (header names ignore case)"],
        id="twice",
    ),
    pytest.param(
        "[3]",
        ["identity.introspect.headers[0]: 3 is not a header name"],
        id="not-a-string",
    ),
]


@pytest.mark.parametrize(("names", "expected"), CREDENTIAL_HEADERS)
def test_extra_credential_headers_must_reach_the_console_unchanged(
    tmp_path: Path, names: str, expected: list[str]
) -> None:
    assert problems(write(tmp_path, f"identity: {{introspect: {{headers: {names}}}}}")) == expected


def test_an_extra_credential_header_cannot_be_a_configured_identity_header(
    tmp_path: Path,
) -> None:
    text = "identity: {introspect: {headers: [X-Auth-User]}, headers: {user: x-auth-user}}"
    assert problems(write(tmp_path, text)) == [
        "identity: introspect.headers: 'X-Auth-User' is one of the identity headers "
        "(identity.headers), which only a trusted proxy may send"
    ]


PROXY_SESSION_COOKIES = [
    pytest.param(
        "identity: {headers: {session_cookie: 'oauth2 proxy'}}",
        ["identity.headers.session_cookie: 'oauth2 proxy' is not a cookie name"],
        id="not-a-token",
    ),
    pytest.param(
        "identity: {headers: {session_cookie: 'a=b'}}",
        ["identity.headers.session_cookie: 'a=b' is not a cookie name"],
        id="with-equals",
    ),
    pytest.param(
        "identity: {headers: {session_cookie: ''}}",
        ["identity.headers.session_cookie: '' is not a cookie name"],
        id="empty",
    ),
    pytest.param(
        "identity: {headers: {session_cookie: sidecar_session}}",
        [
            "(top level): identity.headers.session_cookie names the sidecar's own cookie "
            "(mfa.session.cookie_name)"
        ],
        id="the-sidecars-own",
    ),
]


@pytest.mark.parametrize(("text", "expected"), PROXY_SESSION_COOKIES)
def test_the_proxy_session_cookie_must_be_a_cookie_name_not_ours(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    assert problems(write(tmp_path, text)) == expected


def test_the_proxy_session_cookie_is_off_unless_named(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env=ENV).identity.headers.session_cookie is None
    path = write(tmp_path, "identity: {headers: {session_cookie: _oauth2_proxy}}")
    assert load_config(path, env=ENV).identity.headers.session_cookie == "_oauth2_proxy"
