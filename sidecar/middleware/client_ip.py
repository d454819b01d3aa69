"""Pipeline step 1: decide which address the request comes from, and so what the console is
told about it (the forwarding context the proxy and identity introspection both send).

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
from sidecar.net import IpAddress, Unresolved, forwarding_context, parse_ip, resolve_client_ip
from sidecar.net.forwarding import Scheme
from sidecar.state import CLIENT_IP, DECISION, FORWARDING, PEER_TRUSTED, REASON

_PEER_CACHE_SIZE = 4096


def client_ip_middleware(*, live: LiveSettings, listener_scheme: Scheme) -> Middleware:
    """``listener_scheme``: ``https`` when the public listener terminates TLS itself."""
    # Parsing an address costs microseconds and the same peers (a balancer, keep-alive
    # clients) come back request after request: remember the last few thousand.
    peers: dict[str, IpAddress | None] = {}

    def parse_peer(remote: str | None) -> IpAddress | None:
        if remote is None:
            return None
        try:
            return peers[remote]
        except KeyError:
            if len(peers) >= _PEER_CACHE_SIZE:
                peers.clear()
            peers[remote] = parsed = parse_ip(remote)
            return parsed

    @web.middleware
    async def client_ip(request: web.Request, handler: Handler) -> web.StreamResponse:
        policy = live.network
        peer = parse_peer(request.remote)
        trusted = peer is not None and peer in policy.trusted_proxies
        request[PEER_TRUSTED] = trusted
        resolved: IpAddress | Unresolved
        if peer is not None and not trusted:
            resolved = peer  # an untrusted peer is the client, whatever its headers say
        else:
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
        request[FORWARDING] = forwarding_context(
            client_ip=resolved,
            host=request.headers.get("Host"),
            peer_trusted=trusted,
            forwarded_proto=request.headers.getall("X-Forwarded-Proto", ()),
            listener_scheme=listener_scheme,
        )
        return await handler(request)

    return client_ip
