"""Typed, frozen configuration loaded from YAML.

``load_config(path)`` reads the file, expands ``${VAR}`` references from the environment,
validates every key with pydantic and returns a frozen :class:`Config`. Every problem is
reported at once as a :class:`ConfigError` whose lines name the YAML path and the bad value,
e.g. ``security.ip_allowlist[3]: '10.0.0.0/33' is not a CIDR``. Unknown keys are errors: a
typo in a security setting must never be silently ignored.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from urllib.parse import urlsplit

import yaml
from cryptography.fernet import Fernet
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sidecar.config_checks import ACKNOWLEDGEMENTS, refusals
from sidecar.http_fields import credential_header_problem

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# --- value parsers -------------------------------------------------------------------------

# ASCII digits only (``\d`` would also take other scripts' digits). Sizes stop at 20 digits so
# that int() never meets Python's 4300-digit limit, a ValueError instead of our message.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)
_BARE_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d{1,20})\s*(b|kb|kib|mb|mib|gb|gib)?", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def _bad(message: str) -> PydanticCustomError:
    """An error about the value itself: reported as ``path: 'value' message``."""
    return PydanticCustomError("bad_value", message)


def _conflict(message: str) -> PydanticCustomError:
    """An error about how settings fit together: reported as ``path: message``."""
    return PydanticCustomError("conflict", message)


#: Ten years: longer durations are typos, and they overflow date arithmetic (timedelta).
MAX_DURATION_SECONDS = 3650 * 86400.0


def parse_duration(value: object) -> float:
    """``90s``, ``15m``, ``72h``, ``7d``, ``1h30m``, ``250ms`` or a number of seconds.

    A number may also come as a string (``${TIMEOUT}`` expands to one). Infinite and NaN
    (YAML ``.inf``, ``.nan``) are refused: every later comparison with them misbehaves.
    """
    if isinstance(value, bool):
        raise _bad("is not a duration (use e.g. 90s, 15m, 72h, 7d)")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            text = value.strip().lower()
            if _BARE_NUMBER.fullmatch(text):
                seconds = float(text)
            else:
                parts = _DURATION_PART.findall(text)
                if not parts or "".join(n + u for n, u in parts) != text:
                    raise _bad("is not a duration (use e.g. 90s, 15m, 72h, 7d)")
                seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
        else:
            raise _bad("is not a duration (use e.g. 90s, 15m, 72h, 7d)")
    except OverflowError:  # float(10**400)
        raise _bad("is too long a duration") from None
    if math.isnan(seconds):
        raise _bad("is not a duration (use e.g. 90s, 15m, 72h, 7d)")
    if math.isinf(seconds) or seconds > MAX_DURATION_SECONDS:
        raise _bad("is too long a duration (at most 3650d)")
    if seconds < 0:
        raise _bad("must not be negative")
    return seconds


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise _bad("must be more than zero")
    return seconds


def parse_size(value: object) -> int:
    """``512KiB``, ``64MiB``, ``1GiB`` (also KB/MB/GB, powers of 1000) or a number of bytes."""
    if isinstance(value, bool):
        raise _bad("is not a size (use e.g. 512KiB, 64MiB, 1GiB or bytes)")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        unit = match.group(2).lower() if match.group(2) else None
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise _bad("is not a size (use e.g. 512KiB, 64MiB, 1GiB or bytes)")
    if size <= 0:
        raise _bad("must be positive")
    return size


def _at_most_1gib(size: int) -> int:
    # Beyond this, one message per connection is a memory budget no console needs (and
    # aiohttp's WebSocket reader keeps its limit in a 32-bit field).
    if size > 1024**3:
        raise _bad("must be at most 1GiB")
    return size


def parse_cidr(value: object) -> IpNetwork:
    """A CIDR such as ``10.0.0.0/8`` or ``2001:db8::/32``; a bare address means /32 or /128.

    Host bits set (``10.0.0.1/8``) are an error rather than silently widened: the operator
    probably meant something else. Only strings are accepted (``ip_network(167772160)``
    would quietly accept an integer).
    """
    if not isinstance(value, str):
        raise _bad("is not a CIDR (write it as a quoted string)")
    text = value.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise _bad("has host bits set (did you mean the network address?)") from exc
        raise _bad("is not a CIDR") from exc


def parse_fernet_key(value: object) -> str:
    """A Fernet key: 32 bytes, url-safe base64 (``sidecar keys generate`` prints one)."""
    if not isinstance(value, str):
        raise _bad("is not a key (generate one with `sidecar keys generate`)")
    try:
        Fernet(value.strip())
    except (ValueError, TypeError) as exc:
        raise _bad("is not a valid key (generate one with `sidecar keys generate`)") from exc
    return value.strip()


def parse_credential_header(value: object) -> str:
    """A header name introspection may send as a credential (see credential_header_problem)."""
    if not isinstance(value, str):
        raise _bad("is not a header name")
    problem = credential_header_problem(value)
    if problem is not None:
        raise _bad(problem)
    return value


def parse_acknowledgement(value: object) -> str:
    """A name from ``sidecar.config_checks.ACKNOWLEDGEMENTS``, exactly as listed there."""
    if not isinstance(value, str) or value not in ACKNOWLEDGEMENTS:
        raise _bad(f"is not an acknowledgement (one of: {', '.join(ACKNOWLEDGEMENTS)})")
    return value


# RFC 6265 §4.1.1: a cookie name is an HTTP token.
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_cookie_name(value: object) -> str:
    if not isinstance(value, str) or not _COOKIE_NAME.fullmatch(value):
        raise _bad("is not a cookie name")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
# For timeouts and lockout windows, where 0 would silently mean "never" (aiohttp treats a zero
# timeout as no timeout; a zero lockout window never counts two failures together).
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
Size = Annotated[int, BeforeValidator(parse_size)]
Cidr = Annotated[IpNetwork, BeforeValidator(parse_cidr)]
FernetKey = Annotated[str, BeforeValidator(parse_fernet_key)]
CredentialHeader = Annotated[str, BeforeValidator(parse_credential_header)]
CookieName = Annotated[str, BeforeValidator(parse_cookie_name)]
Acknowledgement = Annotated[str, BeforeValidator(parse_acknowledgement)]
Port = Annotated[int, Field(ge=0, le=65535)]


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


# --- the model -----------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=False)


class Tls(_Section):
    cert_file: Path
    key_file: Path

    @model_validator(mode="after")
    def _files_exist(self) -> Tls:
        for name in ("cert_file", "key_file"):
            path: Path = getattr(self, name)
            if not path.is_file():
                raise _conflict(f"{name} {str(path)!r} does not exist or is not a file")
        return self


class Listen(_Section):
    host: str = "0.0.0.0"
    port: Port = 8080
    max_body_size: Size = 64 * 1024**2
    # A complete request head must arrive this soon after the accept (or after the first
    # byte of a later request on a kept-alive connection).
    header_timeout: PositiveDuration = 15.0
    # Open connections, in total and from one TCP peer address (trusted proxies exempt).
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    # Per client: an IPv4 address or an IPv6 /64 (sidecar.net.client_key).
    max_connections_per_address: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    # A request body that sends no byte for this long is cut off (408 if nothing was
    # answered yet): it holds an upstream connection while it is streamed.
    body_timeout: PositiveDuration = 60.0
    # A client that takes none of what is sent to it for this long is disconnected (as
    # nginx's send_timeout): it holds an upstream connection or a WebSocket relay.
    send_timeout: PositiveDuration = 60.0
    # How long an idle kept-alive client connection stays open; above the balancer's own
    # idle timeout when one is in front (else it may reuse a connection being closed).
    keepalive_timeout: PositiveDuration = 75.0
    tls: Tls | None = None
    # How long SIGTERM waits for in-flight requests and WebSockets before closing them.
    drain_timeout: Duration = 30.0


class Admin(_Section):
    host: str = "127.0.0.1"
    port: Port = 9090


class Upstream(_Section):
    url: str = "http://127.0.0.1:3000"
    connect_timeout: PositiveDuration = 5.0
    read_timeout: PositiveDuration = 60.0
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 100
    # How long a request waits for one of max_connections to be free, then 503.
    pool_timeout: PositiveDuration = 5.0
    # Requests one client (IPv4 address or IPv6 /64) may have at the upstream at once: no
    # client can take the whole pool.
    max_requests_per_client: Annotated[int, Field(ge=1, le=100_000)] = 32
    # Relayed WebSockets at once, and per client; not taken from max_connections.
    max_websockets: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    max_websockets_per_client: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    # How long an idle pooled connection is kept; keep it below the console's own idle
    # timeout, or a request may meet a connection the console is just closing.
    keepalive_timeout: Duration = 15.0
    # Largest WebSocket message relayed, in either direction; a bigger one closes the
    # WebSocket with 1009. A message is held whole in memory while it is relayed.
    websocket_max_message: Annotated[Size, AfterValidator(_at_most_1gib)] = 1024**2

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _bad("is not an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise _bad("must not contain credentials, a query or a fragment")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise _bad("has an invalid port") from exc
        return value.rstrip("/")


class Network(_Section):
    trusted_proxies: list[Cidr] = []
    client_ip_header: Annotated[
        Literal["x-forwarded-for", "forwarded", "x-real-ip"], BeforeValidator(_lower)
    ] = "x-forwarded-for"
    block_status: Annotated[int, Field(ge=400, le=599)] = 403


def _not_blank(value: str) -> str:
    if not value.strip():
        raise _bad("must not be empty")
    return value


NotBlank = Annotated[str, AfterValidator(_not_blank)]


class IntrospectApiToken(_Section):
    """How the console's introspection answer marks an API token: ``field`` (a key or dot
    path) holds ``value``. Consulted only for requests whose credentials are Bearer-only."""

    field: NotBlank
    value: NotBlank


class Introspect(_Section):
    path: str = "/api/me"
    id_field: str = "id"
    email_field: str = "email"
    role_field: str = "role"
    cache_ttl: Duration = 30.0
    cache_size: Annotated[int, Field(ge=1)] = 10_000
    # Names of the console's session cookies: only these are sent to the introspection
    # endpoint and bind the sidecar's verification, so an unrelated cookie (analytics, a UI
    # preference) changing does not end it. Empty: every cookie counts.
    cookies: list[str] = []
    timeout: PositiveDuration = 5.0
    # Extra request headers that carry the console's credentials (an API key header): sent
    # to the introspection endpoint with Cookie and Authorization, counted as credentials
    # (a request carrying only one is introspected) and bound into the sidecar session.
    headers: list[CredentialHeader] = []
    # Bearer-only requests the console's answer marks as API tokens skip the MFA gate;
    # null: none does.
    api_token: IntrospectApiToken | None = None

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.startswith("//"):
            raise _bad("must be an absolute path such as /api/me")
        return value

    @field_validator("headers")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in value:
            if name.lower() in seen:
                raise _conflict(f"{name!r} is listed twice (header names ignore case)")
            seen.add(name.lower())
        return value


class IdentityHeaders(_Section):
    user: str = "X-Forwarded-User"
    email: str = "X-Forwarded-Email"
    groups: str = "X-Forwarded-Groups"
    # The auth proxy's session cookie (oauth2-proxy: _oauth2_proxy). When set, its value is
    # part of the credential the sidecar session binds to, so a new proxy login means a new
    # MFA verification.
    session_cookie: CookieName | None = None


class JwtApiToken(_Section):
    """How an API token differs from a browser session token: its claim ``claim`` (a name
    or dot path) is ``value`` (or a list holding it). Only header tokens are considered."""

    claim: NotBlank
    value: NotBlank


class Jwt(_Section):
    cookie: str | None = None
    header: str = "Authorization"
    algorithms: list[str] = ["RS256", "ES256"]
    key: str | None = None
    key_file: Path | None = None
    audience: str | None = None
    issuer: str | None = None
    id_claim: str = "sub"
    email_claim: str = "email"
    role_claim: str = "role"
    # Header tokens carrying this claim skip the MFA gate; null: none does.
    api_token: JwtApiToken | None = None


class Identity(_Section):
    source: Literal["introspect", "headers", "jwt"] = "introspect"
    introspect: Introspect = Introspect()
    headers: IdentityHeaders = IdentityHeaders()
    jwt: Jwt = Jwt()
    admin_roles: list[str] = ["admin", "owner"]

    @model_validator(mode="after")
    def _jwt_has_key(self) -> Identity:
        if self.source == "jwt" and not (self.jwt.key or self.jwt.key_file):
            raise _conflict("source is jwt but neither jwt.key nor jwt.key_file is set")
        return self

    @model_validator(mode="after")
    def _credential_headers_are_not_identity_headers(self) -> Identity:
        # The proxy strips the identity headers from untrusted peers: introspection would
        # judge a credential the console never receives.
        identity_headers = {self.headers.user, self.headers.email, self.headers.groups}
        lowered = {name.lower() for name in identity_headers}
        for name in self.introspect.headers:
            if name.lower() in lowered:
                raise _conflict(
                    f"introspect.headers: {name!r} is one of the identity headers "
                    "(identity.headers), which only a trusted proxy may send"
                )
        return self


class Security(_Section):
    managed_by: Literal["store", "config"] = "store"
    mfa_policy: Literal["optional", "admins", "all"] = "optional"
    grace_period: Duration = 72 * 3600.0
    ip_allowlist: list[Cidr] = []
    ip_denylist: list[Cidr] = []


class Lockout(_Section):
    max_failures: Annotated[int, Field(ge=1)] = 5
    # Per client address, across every user behind it (an office's NAT): much higher, so that
    # one member's wrong codes never lock their colleagues out.
    max_failures_per_address: Annotated[int, Field(ge=1)] = 50
    window: PositiveDuration = 15 * 60.0
    ban: PositiveDuration = 15 * 60.0


class Session(_Section):
    secret_keys: Annotated[list[FernetKey], Field(min_length=1)]
    cookie_name: str = "sidecar_session"
    secure: bool = True


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


class Mfa(_Section):
    path_prefix: str = "/mfa"
    rp_id: str = "console.example.com"
    rp_name: str = "Console"
    origin: Annotated[list[str], BeforeValidator(_one_or_many), Field(min_length=1)] = [
        "https://console.example.com"
    ]
    exempt_paths: list[str] = ["/logout", "/static/"]
    # Bearer-only requests meet the MFA gate unless their identity source recognised an API
    # token (identity.*.api_token); false lets every one of them skip it (the old default).
    enforce_on_tokens: bool = True
    verify_every: PositiveDuration = 12 * 3600.0
    lockout: Lockout = Lockout()
    session: Session

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
            raise _bad("must look like /mfa (a path without a trailing slash)")
        return value

    @field_validator("origin")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        for value in values:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _conflict(f"{value!r} is not an origin such as https://console.example")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise _conflict(f"{value!r} must be an origin without a path")
        return [v.rstrip("/") for v in values]

    @field_validator("exempt_paths")
    @classmethod
    def _exempt(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.startswith("/"):
                raise _conflict(f"{value!r} must start with /")
        return values

    @model_validator(mode="after")
    def _rp_id_matches_origins(self) -> Mfa:
        # WebAuthn: the RP ID must equal the origin's host or be a registrable suffix of it.
        for origin in self.origin:
            host = urlsplit(origin).hostname or ""
            if host != self.rp_id and not host.endswith("." + self.rp_id):
                raise _conflict(f"rp_id {self.rp_id!r} is not the host of origin {origin!r}")
        return self


class Storage(_Section):
    url: str = "sqlite:////var/lib/sidecar/state.db"
    encryption_key: FernetKey

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"(sqlite(\+aiosqlite)?:///.|postgres(ql)?(\+asyncpg)?://.)", value):
            raise _bad("must be sqlite:///path or postgresql://user@host/db")
        return value


class Audit(_Section):
    file: str = "-"

    @field_validator("file")
    @classmethod
    def _writable(cls, value: str) -> str:
        # Checked here so that a typo fails `check-config` and start-up, not the first
        # enrollment (whose record could then not be written).
        if value == "-":
            return value
        path = Path(value)
        target = path if path.exists() else path.parent
        if not target.exists():
            raise _bad(f"cannot be written: directory {str(path.parent)!r} does not exist")
        if path.is_dir() or not os.access(target, os.W_OK):
            raise _bad("cannot be written (a directory, or no write permission)")
        return value


class Logging(_Section):
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    format: Literal["json", "text"] = "json"


class Config(_Section):
    """The whole configuration: one attribute per top-level YAML key."""

    listen: Listen = Listen()
    admin: Admin = Admin()
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    upstream: Upstream = Upstream()
    network: Network = Network()
    identity: Identity = Identity()
    security: Security = Security()
    mfa: Mfa
    storage: Storage
    audit: Audit = Audit()
    logging: Logging = Logging()
    # Settings that switch a protection off are refused unless named here, one name per kind
    # (sidecar.config_checks); each accepted one is still reported at every start and reload.
    acknowledge_insecure: list[Acknowledgement] = []

    @field_validator("acknowledge_insecure")
    @classmethod
    def _listed_once(cls, values: list[str]) -> list[str]:
        for index, name in enumerate(values):
            if name in values[:index]:
                raise _conflict(f"{name!r} is listed twice")
        return values

    @model_validator(mode="after")
    def _proxy_cookie_is_not_ours(self) -> Config:
        # Bound to the sidecar's own cookie, every verification (which re-issues it) would
        # end itself.
        if self.identity.headers.session_cookie == self.mfa.session.cookie_name:
            raise _conflict(
                "identity.headers.session_cookie names the sidecar's own cookie "
                "(mfa.session.cookie_name)"
            )
        return self


# --- loading -------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:  # `? [a, b]: c` would otherwise escape as a TypeError
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "a key must be a plain value, not a list or mapping",
                key_node.start_mark,
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Secrets may come from the environment without being named in the YAML, so that a config
# file can be committed without them.
_ENV_DEFAULTS = {
    ("mfa", "session", "secret_keys"): ("SIDECAR_SESSION_KEY", True),
    ("storage", "encryption_key"): ("SIDECAR_DATA_KEY", False),
}


def format_path(loc: tuple[str | int, ...]) -> str:
    """``('security', 'ip_allowlist', 3)`` -> ``security.ip_allowlist[3]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _expand_env(
    node: object, env: Mapping[str, str], loc: tuple[str | int, ...], unset: dict[str, list[str]]
) -> object:
    if isinstance(node, dict):
        return {k: _expand_env(v, env, (*loc, str(k)), unset) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, env, (*loc, i), unset) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                unset.setdefault(format_path(loc), []).append(name)
                return match.group(0)
            return env[name]

        return _ENV_REF.sub(substitute, node)
    return node


def _apply_env_defaults(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for path, (var, as_list) in _ENV_DEFAULTS.items():
        section: Any = data
        for key in path[:-1]:
            if not isinstance(section, dict):
                break
            section = section.setdefault(key, {})
        else:
            if isinstance(section, dict) and path[-1] not in section and var in env:
                section[path[-1]] = [env[var]] if as_list else env[var]


def _yaml_loc(data: object, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """The YAML path of a pydantic error location, without pydantic's own tags.

    A part that is a key (or index) in the document is kept whatever it looks like, so an
    unknown key ``a[1]`` is named; other parts holding ``[`` are tags such as ``[key]`` or
    ``function-after[...]`` and are dropped.
    """
    out: list[str | int] = []
    node: object = data
    for part in loc:
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and part in node:
            out.append(str(part))  # a YAML key such as `1:` is a name here, not an index
            node = node[part]
        elif isinstance(part, str) and "[" in part:
            continue
        else:
            out.append(part)
            node = None
    return tuple(out)


# Values at these paths never appear in messages: they end up on terminals and, for a refused
# reload, in logs.
_SECRET_PATHS = ("mfa.session.secret_keys", "storage.encryption_key", "identity.jwt.key")
_SHOW_MAX = 60


def _is_secret(path: str) -> bool:
    return any(path == p or path.startswith((p + "[", p + ".")) for p in _SECRET_PATHS)


def _show(value: object) -> str:
    """The bad value as written, cut short so a whole section never floods the output."""
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _describe(error: Mapping[str, Any], *, secret: bool = False) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    message = str(error["msg"])
    if kind == "conflict":
        return message
    if kind != "bad_value":
        message = f"{message[0].lower()}{message[1:]}"
    if secret:
        return message
    shown = _show(error.get("input"))
    return f"{shown} {message}" if kind == "bad_value" else f"{shown}: {message}"


def _secret_hint(path: str) -> str:
    if path == "mfa.session.secret_keys":
        return " (set it in the YAML or SIDECAR_SESSION_KEY; `sidecar keys generate` makes one)"
    if path == "storage.encryption_key":
        return " (set it in the YAML or SIDECAR_DATA_KEY; `sidecar keys generate` makes one)"
    return ""


def parse_config(data: object, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML document; raises ConfigError listing every problem.

    A valid document is also refused when a setting switches a protection off and
    ``acknowledge_insecure`` does not accept it (``sidecar.config_checks.refusals``).
    """
    env = os.environ if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping of sections such as listen:, mfa:"])
    env_errors: dict[str, list[str]] = {}
    expanded = cast(dict[str, Any], _expand_env(data, env, (), env_errors))
    _apply_env_defaults(expanded, env)
    problems = [
        f"{path}: environment variable {names[0]} is not set"
        if len(names) == 1
        else f"{path}: environment variables {', '.join(names)} are not set"
        for path, names in env_errors.items()
    ]
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        for error in exc.errors():
            path = format_path(_yaml_loc(expanded, error["loc"]))
            if any(path == p or path.startswith(p + "[") for p in env_errors):
                continue  # already reported as a missing variable
            line = f"{path}: {_describe(error, secret=_is_secret(path))}"
            if error["type"] == "missing":
                line += _secret_hint(path)
            problems.append(line)
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    refused = refusals(config)
    if refused:
        raise ConfigError(refused)
    return config


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; raises ConfigError naming every problem."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: is not UTF-8 text"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.reader.ReaderError as exc:  # a control character; it has a position, no mark
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        problem = f"character {chr(exc.character)!r} is not allowed"
        raise ConfigError([f"{source}:{line}:{column}: invalid YAML: {problem}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    except RecursionError:  # PyYAML composes recursively
        raise ConfigError([f"{source}: invalid YAML: nested too deeply"]) from None
    return parse_config(data, env)
