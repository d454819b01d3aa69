"""HTTP header fields the sidecar treats specially on the hop to the console, in one place.

The proxy and identity introspection both send requests to the console, and config
validation checks header names against the same sets, so the rules live here: which fields
never cross the hop, which ones only the sidecar (or a trusted auth proxy) may write, and how
large the console's answer headers may be.

Pure: imports nothing from the sidecar (the config module validates against it) and does no
I/O. Names in the sets are lower-case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

# RFC 9110 §7.6.1 and RFC 9112 §9.6: connection-specific fields never forwarded. Proxy-*
# authentication is meant for this hop only. Expect is answered by our own server.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

# A Connection header may name hop-by-hop fields; naming these would let a client make the
# console see other credentials or another host than the sidecar judged.
NEVER_HOP_BY_HOP: Final = frozenset({"host", "cookie", "authorization"})

# Forwarding headers the client may have written: replaced by the sidecar's own or dropped,
# never passed on (a client must not choose the address, host, scheme or path the console
# believes). Includes the look-alikes frameworks and CDNs read: X-Original-URL and
# X-Rewrite-URL would let a Symfony/IIS console route to another path than the one judged.
CLIENT_FORWARDING: Final = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-real-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "via",
    }
)

# What oauth2-proxy can send besides the three configured identity headers (its
# --pass-user-headers, --pass-access-token and auth_request --set-xauthrequest modes).
# Stripped from untrusted peers whatever identity.source is: a console behind the sidecar
# may believe them too.
OAUTH2_PROXY_HEADERS: Final = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-forwarded-access-token",
        "x-auth-request-user",
        "x-auth-request-email",
        "x-auth-request-groups",
        "x-auth-request-preferred-username",
        "x-auth-request-access-token",
    }
)

# Identity headers other servers believe (besides identity.headers and oauth2-proxy's):
# removed from requests of untrusted peers like the configured ones.
LOOKALIKE_IDENTITY: Final = frozenset(
    {"remote-user", "x-remote-user", "x-remote-email", "x-remote-groups", "x-user", "x-email"}
)

# Consoles send more and larger headers than aiohttp's client defaults (8 KiB, 128 lines)
# allow: many Set-Cookie lines, large CSP headers. Every client session that talks to the
# console (the proxy's pool, identity introspection) reads answers with these limits, so an
# answer the proxy would relay is never one introspection cannot read.
UPSTREAM_MAX_FIELD: Final = 64 * 1024
UPSTREAM_MAX_HEADERS: Final = 512

# Fields identity introspection writes itself (a GET without a body, asking for JSON).
_SET_BY_INTROSPECTION: Final = frozenset({"accept", "content-length", "content-type"})

# RFC 9110 §5.6.2: field names are tokens.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def connection_tokens(lines: Iterable[str]) -> set[str]:
    """The lower-case field names the ``Connection`` lines name (RFC 9110 §7.6.1)."""
    tokens: set[str] = set()
    for value in lines:
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def credential_header_problem(name: str) -> str | None:
    """Why ``name`` cannot be an extra credential header sent to introspection, or None.

    A credential header must reach the console exactly as introspection saw it, or the two
    could judge different credentials. So it must be a plain field name (a token without
    ``_``: the proxy drops underscored names, which CGI-style servers conflate with dashed
    ones) and none of the fields the sidecar removes, replaces or sets itself: hop-by-hop
    fields, Host, Cookie and Authorization (already credentials), forwarding headers, and
    identity headers (stripped from untrusted peers). ``Sec-`` and ``Proxy-`` names are
    refused too: browsers reserve them (Fetch "forbidden request-header"), and the proxy
    regenerates the WebSocket ``Sec-`` fields.
    """
    if not _TOKEN.fullmatch(name):
        return "is not an HTTP header name"
    lowered = name.lower()
    if "_" in lowered:
        return "contains '_': the proxy drops such headers, so the console would never see it"
    if lowered in HOP_BY_HOP or lowered.startswith(("proxy-", "sec-")):
        return "is a hop-by-hop or reserved header"
    if lowered == "host":
        return "is the Host header, which is context, not a credential"
    if lowered in NEVER_HOP_BY_HOP:
        return "is always sent to introspection already"
    if lowered in _SET_BY_INTROSPECTION:
        return "is set by the sidecar on the introspection request"
    if lowered in CLIENT_FORWARDING:
        return "is a forwarding header the sidecar sets itself"
    if lowered in OAUTH2_PROXY_HEADERS or lowered in LOOKALIKE_IDENTITY:
        return "is an identity header only a trusted proxy may send"
    return None
