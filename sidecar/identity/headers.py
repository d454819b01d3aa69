"""Identity from an authenticating proxy in front of the sidecar (e.g. oauth2-proxy).

Security assumption: the proxies in ``network.trusted_proxies`` authenticate every request
and *replace* the identity headers (``identity.headers.user/email/groups``) with their own.
Headers from any other peer are client-written and never believed; the proxy stage strips
them (:func:`identity_header_names`, :func:`strip_identity_headers`) so the console does not
believe them either.

* Untrusted peer, or no user header: anonymous.
* More than one distinct user (or email) value: :class:`IdentityUnavailable`. The console
  might pick either one; calling the request anonymous would let it skip the MFA gate.
* Role: the first group (comma-separated, all lines) in ``identity.admin_roles``, else the
  first group, else None.
* ``bearer_only`` only for ``Authorization: Bearer`` without console cookies, for the same
  reason as in :mod:`sidecar.identity.introspect`. ``api_token`` never: the proxy says who
  the user is, not what kind of credential it accepted, so an API client's token and a
  browser session token sent as a bearer token look alike here. Bearer requests therefore
  meet the MFA gate unless ``mfa.enforce_on_tokens`` is false (which exempts both).

The session binding (``Identity.credential_hash``): user, email and groups, so a change of
role needs a new verification. That alone survives the user's logout and re-login at the
auth proxy: the sidecar's verification then lasts until ``mfa.verify_every``. With
``identity.headers.session_cookie`` set (oauth2-proxy: ``_oauth2_proxy``), the value of the
proxy's session cookie is bound too, so a new proxy session means a new verification:

* Every occurrence of the cookie counts, and its split parts ``<name>_0``, ``<name>_1``, ...
  (oauth2-proxy splits sessions over 4 KB so), in the order sent.
* A request the proxy vouched for without that cookie is bound to its ``Authorization``
  lines when it is a Bearer-token request (the proxy's JWT bearer pass-through: the token is
  the credential). Any other request without it is :class:`IdentityUnavailable` (503): the
  cookie name is probably wrong, and binding to nothing would silently give up the promise
  (while "anonymous" would skip the MFA gate).
* A proxy that rewrites its cookie while the session lasts (oauth2-proxy does at each
  ``--cookie-refresh``) asks for verification again at each rewrite.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Config
from sidecar.config import IdentityHeaders as HeaderSettings
from sidecar.http_fields import OAUTH2_PROXY_HEADERS
from sidecar.identity.base import (
    Identity,
    IdentityUnavailable,
    bearer_token,
    choose_role,
    console_cookies,
    cookie_pairs,
    credential_hash,
    string_or_none,
    valid_user_id,
)
from sidecar.net.forwarding import Forwarding


def identity_header_names(config: Config) -> frozenset[str]:
    """Lower-case names of identity headers that only a trusted auth proxy may send.

    The configured ``identity.headers`` plus oauth2-proxy's other identity headers,
    whatever ``identity.source`` is.
    """
    settings = config.identity.headers
    configured = {settings.user, settings.email, settings.groups}
    return frozenset(name.lower() for name in configured) | OAUTH2_PROXY_HEADERS


def strip_identity_headers(headers: CIMultiDict[str], names: Collection[str]) -> list[str]:
    """Remove every line of the headers in ``names`` (lower-case) from ``headers``, in place.

    Returns the names removed (as the client spelled them, once each) so the caller can log
    that an untrusted client tried to send identity headers; never their values.
    """
    removed: list[str] = []
    for name in list(headers.keys()):
        if name.lower() in names and name in headers:
            headers.popall(name)
            removed.append(name)
    return removed


class HeadersProvider:
    """Believes identity headers from trusted peers only; see the module docstring."""

    def __init__(
        self,
        *,
        settings: HeaderSettings,
        admin_roles: Sequence[str],
        own_cookie: str | None = None,
    ) -> None:
        self._settings = settings
        self._admin_roles = tuple(admin_roles)
        self._own_cookie = own_cookie

    @classmethod
    def from_config(cls, config: Config) -> HeadersProvider:
        return cls(
            settings=config.identity.headers,
            admin_roles=config.identity.admin_roles,
            own_cookie=config.mfa.session.cookie_name,
        )

    async def identify(
        self, headers: CIMultiDictProxy[str], peer_trusted: bool, forwarding: Forwarding
    ) -> Identity | None:
        del forwarding  # the auth proxy vouched for the user; nothing is asked upstream
        if not peer_trusted:
            return None
        settings = self._settings
        user = _single_value(headers, settings.user)
        if user is None:
            return None
        if not valid_user_id(user):
            # Header bytes that were not UTF-8, control characters, an absurd length: the
            # proxy vouched for someone the sidecar cannot key state by. Fail closed.
            raise IdentityUnavailable("trusted proxy sent a user id the sidecar cannot use")
        email = string_or_none(_single_value(headers, settings.email))
        groups = [
            group.strip()
            for line in headers.getall(settings.groups, ())
            for group in line.split(",")
            if group.strip()
        ]
        cookies = console_cookies(headers.getall("Cookie", ()), self._own_cookie)
        authorizations = [line for line in headers.getall("Authorization", ()) if line.strip()]
        bearer_only = (
            not cookies
            and bool(authorizations)
            and all(bearer_token(line) is not None for line in authorizations)
        )
        binding = [[user], [email or ""], groups]
        session_cookie = settings.session_cookie
        if session_cookie is not None:
            session = proxy_session(headers.getall("Cookie", ()), session_cookie)
            if session:
                binding.append(session)
            elif bearer_only:
                binding.append(["authorization", *authorizations])
            else:
                raise IdentityUnavailable(
                    f"trusted proxy vouched for a user without its session cookie "
                    f"{session_cookie!r} (identity.headers.session_cookie)"
                )
        return Identity(
            user_id=user,
            email=email,
            role=choose_role(groups, self._admin_roles),
            bearer_only=bearer_only,
            api_token=False,
            credential_hash=credential_hash(*binding),
        )

    async def close(self) -> None:
        return None


def proxy_session(lines: Sequence[str], name: str) -> list[str]:
    """The auth proxy's session cookie in the ``Cookie`` ``lines``, as ``name=value`` pairs.

    Every non-empty occurrence of ``name``, then its split parts ``name_0``, ``name_1``, ...
    up to the first missing index (oauth2-proxy's convention for sessions over 4 KB). Empty:
    no session cookie.
    """
    values: dict[str, list[str]] = {}
    for line in lines:
        for cookie, value in cookie_pairs(line):
            if value:
                values.setdefault(cookie, []).append(value)
    found = [f"{name}={value}" for value in values.get(name, ())]
    index = 0
    while (part := f"{name}_{index}") in values:
        found.extend(f"{part}={value}" for value in values[part])
        index += 1
    return found


def _single_value(headers: CIMultiDictProxy[str], name: str) -> str | None:
    values = {line.strip() for line in headers.getall(name, ()) if line.strip()}
    if len(values) > 1:
        raise IdentityUnavailable(f"trusted proxy sent {len(values)} different {name} values")
    return values.pop() if values else None
