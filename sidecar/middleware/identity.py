"""Pipeline step 4: who is calling, from the console itself (or an auth proxy, or a JWT).

Runs for every request that may need an MFA decision or is for the sidecar's own pages;
exempt paths skip it (they pass the gate whoever calls). The provider also gets the
request's forwarding context (computed by the client-IP stage), so that introspection asks
the console about the same client, host and scheme the proxy will forward. When the
identity cannot be decided (console down, timeout, bad answer) the request is refused with
503: treating it as anonymous would let a logged-in user past the MFA gate.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.answers import unavailable
from sidecar.decision import Decision
from sidecar.identity.base import IdentityProvider, IdentityUnavailable
from sidecar.live import LiveSettings
from sidecar.paths import is_exempt, is_under
from sidecar.refused_summary import RefusedSummary
from sidecar.state import DECISION, FORWARDING, IDENTITY, PEER_TRUSTED, REASON

log = logging.getLogger("sidecar.identity")


class IdentityRef:
    """The current identity provider; a reload that changes ``identity:`` swaps it."""

    def __init__(self, provider: IdentityProvider) -> None:
        self.provider = provider


def identity_middleware(
    *, live: LiveSettings, identity: IdentityRef, refused: RefusedSummary
) -> Middleware:
    prefix = live.config.mfa.path_prefix  # fixed until restart: the routes live there

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Routing (the prefix) follows aiohttp's decoded path; exemptions match the raw path,
        # which is what the console receives ("%2F" stays "%2F" and is never exempt).
        raw = request.rel_url.raw_path
        exempt = is_exempt(raw, live.config.mfa.exempt_paths)
        if exempt and not is_under(request.path, prefix):
            return await handler(request)
        try:
            request[IDENTITY] = await identity.provider.identify(
                request.headers, request.get(PEER_TRUSTED, False), request[FORWARDING]
            )
        except IdentityUnavailable as exc:
            request[DECISION] = Decision.IDENTITY_UNAVAILABLE
            request[REASON] = str(exc)
            refused.note("identity unavailable", str(exc))
            return unavailable(
                request, "identity_unavailable", "The console could not confirm who you are."
            )
        return await handler(request)

    return identify
