"""Pipeline step 2: the organization's IP denylist, then allowlist, before any identity work.

A refused request gets ``network.block_status`` with a short plain body and causes no upstream
I/O (WebSocket upgrades are refused before any 101) and no store I/O: it is counted in the
metrics and in memory for the audit trail, which gets aggregated ``ip.blocked`` records per
/24 or /64 from a background task (``sidecar.blocked_audit``), so a flood from many
addresses cannot turn into a flood of store writes.
"""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.answers import unavailable
from sidecar.blocked_audit import BlockedAudit
from sidecar.decision import Decision
from sidecar.live import LiveSettings
from sidecar.state import CLIENT_IP, DECISION, REASON

_BODY = {
    Decision.DENIED_IP: "Access denied: your network address is blocked.\n",
    Decision.NOT_ALLOWLISTED: "Access denied: your network address is not on the allowlist.\n",
}


def ip_gate_middleware(*, live: LiveSettings, blocked: BlockedAudit) -> Middleware:
    @web.middleware
    async def ip_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        ip = request[CLIENT_IP]
        if ip is None:  # pragma: no cover - the client-ip stage refuses these first
            return await handler(request)
        policy = live.network
        if not live.loaded:
            # The store-held lists were never loaded: refuse rather than judge by YAML
            # lists that the Security page may have changed since.
            request[DECISION] = Decision.STORE_UNAVAILABLE
            request[REASON] = "IP lists not loaded from the store yet"
            return unavailable(
                request, "store_unavailable", "Security checks are unavailable right now."
            )
        verdict = policy.gate.decide(ip)
        if verdict.decision is Decision.ALLOWED:
            return await handler(request)
        rule = str(verdict.rule) if verdict.rule is not None else None
        request[DECISION] = verdict.decision
        request[REASON] = f"{verdict.list_name} {rule}" if rule else "no allowlist rule matched"
        blocked.count(ip, verdict.decision, rule=rule, list_name=verdict.list_name, now=time.time())
        return web.Response(status=policy.block_status, text=_BODY[verdict.decision])

    return ip_gate
