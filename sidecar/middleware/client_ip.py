"""Pipeline step 1: decide which address the request comes from.

Security assumption: only peers in ``network.trusted_proxies`` may speak for the client
through a forwarded header; for everyone else the TCP peer is the client and their forwarded
headers are ignored (the proxy replaces them before forwarding). When a trusted proxy sends a
header we cannot read, the request is refused: guessing could let an attacker-written entry
through (see ``sidecar.net.client_ip``).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.decision import Decision
from sidecar.live import LiveSettings
from sidecar.net import Unresolved, parse_ip, resolve_client_ip
from sidecar.state import CLIENT_IP, DECISION, PEER_TRUSTED, REASON


def client_ip_middleware(*, live: LiveSettings) -> Middleware:
    @web.middleware
    async def client_ip(request: web.Request, handler: Handler) -> web.StreamResponse:
        policy = live.network
        peer = parse_ip(request.remote) if request.remote else None
        request[PEER_TRUSTED] = peer is not None and peer in policy.trusted_proxies
        resolved = resolve_client_ip(
            request.remote,
            request.headers.getall(policy.client_ip_header.value, ()),
            policy.trusted_proxies,
            policy.client_ip_header,
        )
        if isinstance(resolved, Unresolved):
            request[CLIENT_IP] = None
            request[DECISION] = Decision.DENIED_IP
            request[REASON] = f"client address unresolved: {resolved.reason}"
            return web.Response(
                status=policy.block_status, text="Access denied: client address unknown.\n"
            )
        request[CLIENT_IP] = resolved
        return await handler(request)

    return client_ip
