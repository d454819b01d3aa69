"""Assembles the sidecar: the public app (the request pipeline) and the admin app.

The pipeline, outermost first (DESIGN "What it is"):

0. request log + metrics            (every request, whatever answers it)
1. client IP                        (trusted proxies, forwarded headers)
2. IP gate                          (denylist, then allowlist; before any identity work)
3. sidecar routes under mfa.path_prefix   (issue #4: setup, verify, security, audit)
4. identity                         (issue #4: introspect | headers | jwt)
5. MFA gate                         (issue #4)
6. proxy                            (the catch-all route: everything else goes upstream)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiohttp import web

from sidecar.audit import AuditLog
from sidecar.config import Config
from sidecar.live import LiveSettings, NetworkPolicy
from sidecar.metrics import Metrics
from sidecar.middleware.client_ip import client_ip_middleware
from sidecar.middleware.ip_gate import ip_gate_middleware
from sidecar.middleware.request_log import request_log_middleware
from sidecar.proxy import AiohttpUpstream, Proxy, UpstreamTransport

CONFIG = web.AppKey("sidecar.config", Config)
METRICS = web.AppKey("sidecar.metrics", Metrics)
LIVE = web.AppKey("sidecar.live", LiveSettings)
AUDIT = web.AppKey("sidecar.audit", AuditLog)
UPSTREAM = web.AppKey[UpstreamTransport]("sidecar.upstream")
#: Set when the process is draining (SIGTERM): /readyz answers 503 from then on.
DRAINING = web.AppKey("sidecar.draining", asyncio.Event)

# The sidecar's own JSON API never needs large bodies; proxied bodies are streamed and
# limited separately by listen.max_body_size.
_OWN_ROUTES_MAX_BODY = 1024**2


def build_app(config: Config, *, metrics: Metrics | None = None) -> web.Application:
    """The public application: the whole request pipeline for one config."""
    metrics = metrics or Metrics()
    live = LiveSettings(NetworkPolicy.build(config))
    audit = AuditLog(config.audit.file, metrics.registry)
    app = web.Application(
        middlewares=[
            request_log_middleware(metrics=metrics),
            client_ip_middleware(live=live),
            ip_gate_middleware(live=live, audit=audit),
        ],
        client_max_size=_OWN_ROUTES_MAX_BODY,
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app[LIVE] = live
    app[AUDIT] = audit
    app[DRAINING] = asyncio.Event()
    _count_ip_rules(metrics, live)

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        app[UPSTREAM] = AiohttpUpstream(config)
        yield
        await app[UPSTREAM].close()
        audit.close()

    app.cleanup_ctx.append(upstream_ctx)
    proxy = Proxy(
        transport=lambda: app[UPSTREAM],
        metrics=metrics,
        max_body_size=config.listen.max_body_size,
        secure_listener=config.listen.tls is not None,
    )
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def _count_ip_rules(metrics: Metrics, live: LiveSettings) -> None:
    metrics.ip_rules.labels("allowlist").set(len(live.network.gate.allowlist))
    metrics.ip_rules.labels("denylist").set(len(live.network.gate.denylist))


def swap_network_policy(app: web.Application, policy: NetworkPolicy) -> None:
    """Replace the live IP lists and trusted proxies atomically (reloads, Security page)."""
    app[LIVE].swap_network(policy)
    _count_ip_rules(app[METRICS], app[LIVE])


def build_admin_app(public: web.Application) -> web.Application:
    """The admin listener's app: /healthz, /readyz and /metrics, never on the public port."""
    admin = web.Application()
    metrics = public[METRICS]
    probe_cache: dict[str, float | bool] = {"at": 0.0, "ok": False}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if public[DRAINING].is_set():
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        # Probing the upstream at most once a second keeps an aggressive prober from
        # turning into load on the console.
        now = time.monotonic()
        if now - float(probe_cache["at"]) >= 1.0:
            probe_cache["ok"] = await public[UPSTREAM].probe()
            probe_cache["at"] = time.monotonic()
        if not probe_cache["ok"]:
            return web.json_response({"ready": False, "reason": "upstream unreachable"}, status=503)
        return web.json_response({"ready": True})

    async def metrics_handler(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/metrics", metrics_handler)
    return admin
