"""Who is calling (DESIGN pipeline step 4): the contract every identity source implements.

A provider answers one of three ways, and callers must keep them apart:

* an :class:`Identity`: the console (or the auth proxy, or a signed token) vouches for a user;
* ``None`` (:data:`ANONYMOUS`): no credentials, or credentials the console refuses;
* :class:`IdentityUnavailable`: no decision can be made now. Callers fail closed (503).
  "Anonymous" would be wrong here: anonymous requests skip the MFA gate, so treating an
  outage or an ambiguous request as anonymous would let a logged-in user through unchecked.

The helpers below are shared by the sources: credential hashing, role choice, field lookup.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import aiohttp
from multidict import CIMultiDictProxy

from sidecar.net.forwarding import Forwarding

if TYPE_CHECKING:
    from sidecar.config import Config
    from sidecar.identity.refusals import TokenRefusals


@dataclass(frozen=True, slots=True)
class Identity:
    """A user the identity source vouches for.

    ``bearer_only``: the request's only credential is a token in the ``Authorization``
    header (or ``identity.jwt.header``): no console cookie, no other credential header. That
    is the shape of an API client's request, but proves nothing on its own: a browser's
    session token can be sent the same way (a phished password is enough to get one).

    ``api_token``: the identity source recognised the credential as an API token by the
    configured rule (``identity.jwt.api_token``, ``identity.introspect.api_token``; the
    headers source never does). Only a bearer-only request can be one. These requests skip
    the MFA gate: the rule is the operator's statement that such tokens are minted inside a
    session that passed MFA. Other bearer-only requests meet the gate unless
    ``mfa.enforce_on_tokens`` is false.

    ``credential_hash``: SHA-256 over the credentials that proved this identity. The sidecar
    binds its own session to it so that a console logout (new credentials) also ends the
    sidecar's verification. It covers credentials only, never the client's address (users
    roam between networks) or the request's host (see each source for what counts). It is
    as good as a password hash for replay purposes inside the sidecar: never log it (it is
    left out of ``repr``).
    """

    user_id: str
    email: str | None
    role: str | None
    bearer_only: bool
    api_token: bool
    credential_hash: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.api_token and not self.bearer_only:
            # A browser request (a cookie next to the token) is never an API client.
            raise ValueError("an API token identity must come from a bearer-only request")


ANONYMOUS: Final = None
"""What providers return for "no user": no credentials, or credentials that were refused."""


class IdentityUnavailable(Exception):
    """The identity cannot be decided now (console down, timeout, bad answer, ambiguity).

    The message says why, for logs; it never contains credentials.
    """


class IdentityProvider(Protocol):
    """One identity source. Implementations are safe for concurrent use on one event loop."""

    async def identify(
        self, headers: CIMultiDictProxy[str], peer_trusted: bool, forwarding: Forwarding
    ) -> Identity | None:
        """The caller's identity from the request ``headers``.

        ``peer_trusted``: the TCP peer is in ``network.trusted_proxies`` (only the headers
        source uses it). ``forwarding``: what the console is told about the request's client,
        host and scheme when it is forwarded (only the introspect source uses it: it asks the
        console in the same context). Raises :class:`IdentityUnavailable` when no decision
        can be made.
        """
        ...

    async def close(self) -> None:
        """Release connections and cancel work in flight."""
        ...


def is_privileged(identity: Identity, admin_roles: Sequence[str]) -> bool:
    """Whether the identity's role is one of ``admin_roles``, compared case-insensitively."""
    return role_is_privileged(identity.role, admin_roles)


def role_is_privileged(role: str | None, admin_roles: Sequence[str]) -> bool:
    """Whether ``role`` (as the console reports it, or as last seen) is one of
    ``admin_roles``, compared case-insensitively (roles are labels, not keys)."""
    if role is None:
        return False
    folded = role.casefold()
    return any(folded == admin.casefold() for admin in admin_roles)


def credential_hash(*groups: Sequence[str]) -> bytes:
    """SHA-256 over groups of strings, framed so that no two different inputs collide.

    JSON gives the framing: ``(["a;b"], [])`` and ``(["a", "b"], [])`` and
    ``(["a"], ["b"])`` encode differently. ``ensure_ascii`` keeps lone surrogates (header
    bytes aiohttp decoded with ``surrogateescape``) encodable.
    """
    encoded = json.dumps([list(group) for group in groups], ensure_ascii=True)
    return hashlib.sha256(encoded.encode("ascii")).digest()


def choose_role(value: object, admin_roles: Sequence[str]) -> str | None:
    """The role to act on from a role field that may be one string or a list of them.

    A list yields its first privileged entry (so an admin who is also a member is treated as
    an admin, the stricter MFA policy), else its first entry. Non-strings and empty strings
    are ignored.
    """
    if isinstance(value, str):
        return value or None
    if not isinstance(value, list | tuple):
        return None
    roles = [item for item in value if isinstance(item, str) and item]
    admins = {admin.casefold() for admin in admin_roles}
    for role in roles:
        if role.casefold() in admins:
            return role
    return roles[0] if roles else None


_MISSING: Final = object()


def lookup_field(document: Mapping[str, object], name: str) -> object:
    """The value at ``name`` in a JSON object, or None.

    ``name`` is first tried as one key (claims such as ``https://example.com/roles`` contain
    dots), then as a dot path into nested objects (``user.id``).
    """
    if name in document:
        return document[name]
    node: object = document
    for part in name.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part, _MISSING)
        if node is _MISSING:
            return None
    return node


def marks_api_token(value: object, expected: str) -> bool:
    """Whether a claim or answer field ``value`` is the configured API-token marker: the
    string ``expected`` itself, or a list holding it (``aud`` may be a list). Compared
    exactly; anything else (absent, another string, a number, a boolean, an object) is no
    marker, and the request meets the MFA gate like a browser session."""
    if isinstance(value, str):
        return value == expected
    if isinstance(value, list):
        return any(isinstance(item, str) and item == expected for item in value)
    return False


#: Longest user id the sidecar keys state by (consoles use ids, emails or UUIDs).
MAX_USER_ID_LENGTH: Final = 256
#: Longest email or role kept; longer values are dropped (they are display data only).
MAX_LABEL_LENGTH: Final = 512


def valid_user_id(text: str) -> bool:
    """Whether ``text`` can key a user's MFA state: not blank, no control characters (NUL,
    which PostgreSQL refuses, newlines, which logs would split), valid Unicode (no lone
    surrogates, which header bytes that were not UTF-8 become), at most
    ``MAX_USER_ID_LENGTH``. Ids are compared exactly everywhere: no trimming, folding or
    normalisation, so any other character is kept as the console sent it."""
    if not text.strip() or len(text) > MAX_USER_ID_LENGTH:
        return False
    return _storable(text)


def user_id_from(value: object) -> str | None:
    """A usable user id: a string passing :func:`valid_user_id` or an integer (not a bool),
    as a string; None otherwise (the caller fails closed: the console named a user the
    sidecar cannot key state by)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and valid_user_id(value):
        return value
    return None


def string_or_none(value: object) -> str | None:
    """A display string (email, role), or None when absent, too long or not storable."""
    if not isinstance(value, str) or not value or len(value) > MAX_LABEL_LENGTH:
        return None
    return value if _storable(value) else None


def _storable(text: str) -> bool:
    """No control characters (Unicode category Cc) and no lone surrogates (Cs)."""
    return not any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def bearer_token(value: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, else None.

    The scheme is case-insensitive (RFC 9110 §11.1, RFC 6750 §2.1).
    """
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def cookie_pairs(line: str) -> list[tuple[str, str]]:
    """``(name, value)`` pairs of one ``Cookie`` line (RFC 6265 §4.2.1: ``a=1; b=2``).

    A cookie value cannot contain ``;`` (RFC 6265 §4.1.1, even quoted), so splitting on it
    is exact for what browsers send. Pairs without ``=`` are skipped.
    """
    pairs = []
    for part in line.split(";"):
        name, equals, value = part.partition("=")
        if equals and name.strip():
            pairs.append((name.strip(), value.strip()))
    return pairs


_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 6265: a token
# Whitespace or a comma inside a value is where cookie parsers disagree: Python's and
# aiohttp's read "a=x b=y" as two cookies, a strict parser as one. Such pairs are dropped.
_AMBIGUOUS_VALUE = re.compile(r"[\s,]")


def console_cookies(
    lines: Sequence[str], own_cookie: str | None, only: Collection[str] | None = None
) -> list[str]:
    """The console's cookies as one normalised ``Cookie`` line (or none).

    Security assumption: the identity the sidecar judges and the credentials the console
    receives must be the same bytes. So both introspection and the proxy send this line:
    well-formed ``name=value`` pairs in their original order, without the sidecar's own
    cookie and without pairs that other parsers could read differently (a value with
    whitespace or a comma, a name that is not a token). ``only`` keeps just the named
    cookies (``identity.introspect.cookies``).
    """
    kept = []
    for line in lines:
        for part in line.split(";"):
            name, equals, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not equals or name == own_cookie or not _COOKIE_NAME.fullmatch(name):
                continue
            if _AMBIGUOUS_VALUE.search(value) or (only is not None and name not in only):
                continue
            kept.append(f"{name}={value}")
    return ["; ".join(kept)] if kept else []


def build_identity_provider(
    config: Config,
    session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    *,
    refusals: TokenRefusals | None = None,
) -> IdentityProvider:
    """The provider for ``config.identity.source``.

    ``session_factory`` makes the HTTP session the introspect source uses (tests inject
    one); the other sources ignore it. ``refusals`` counts the tokens the jwt source
    refuses (the app's one counter, kept across reloads). Raises
    :class:`~sidecar.config.ConfigError` when the JWT key cannot be used with the configured
    algorithms.
    """
    # Imported here: each source module imports this one for the shared types.
    from sidecar.identity.headers import HeadersProvider
    from sidecar.identity.introspect import IntrospectProvider
    from sidecar.identity.jwt import JwtProvider

    source = config.identity.source
    if source == "introspect":
        return IntrospectProvider.from_config(config, session_factory=session_factory)
    if source == "headers":
        return HeadersProvider.from_config(config)
    return JwtProvider.from_config(config, refusals=refusals)
