"""Assembles the sidecar: the public app (the request pipeline) and the admin app.

The pipeline, outermost first (DESIGN "What it is"):

0. request log + metrics       every request, whatever answers it
1. client IP                   trusted proxies, forwarded headers
2. IP gate                     denylist, then allowlist; before any identity work
   canonical path              non-canonical paths are redirected (no exemption tricks)
   session                     aiohttp-session: the sidecar's encrypted cookie, loaded lazily
4. identity                    introspect | headers | jwt (exempt paths skip it)
5. MFA gate                    policy, grace, verification; sidecar routes pass
3. sidecar routes              under mfa.path_prefix: pages and JSON API (router, first)
6. proxy                       the catch-all route: everything else goes upstream

Long-lived parts are created in one cleanup context, in dependency order: the store (migrated
at start), the live settings (loaded, then polled), the identity provider, the upstream pool;
the writer of aggregated ``ip.blocked`` records runs in a second one, inside the first, and
the review of open WebSockets (``sidecar.websocket_review``) in a third.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeVar, cast

from aiohttp import web
from aiohttp_session import session_middleware
from pydantic import BaseModel, ValidationError

from sidecar.audit import AuditLog
from sidecar.blocked_audit import BlockedAudit
from sidecar.config import Config, ConfigError, format_path
from sidecar.identity.base import build_identity_provider
from sidecar.identity.headers import identity_header_names
from sidecar.identity.refusals import TokenRefusals
from sidecar.live import LiveSettings, NetworkPolicy
from sidecar.logs import configure_logging
from sidecar.metrics import Metrics, StoreMetrics
from sidecar.mfa.admin import add_admin_routes
from sidecar.mfa.policy import MfaPolicy
from sidecar.mfa.routes import Handlers, Route, add_prefix_fallback, add_routes, register
from sidecar.mfa.service import MfaMetrics, MfaService
from sidecar.mfa.session import RotatingCookieStorage
from sidecar.middleware.canonical_path import canonical_path_middleware
from sidecar.middleware.client_ip import client_ip_middleware
from sidecar.middleware.identity import IdentityRef, identity_middleware
from sidecar.middleware.ip_gate import ip_gate_middleware
from sidecar.middleware.mfa_gate import mfa_gate_middleware
from sidecar.middleware.request_log import InFlight, request_log_middleware
from sidecar.proxy import AiohttpUpstream, Proxy, UpstreamTransport
from sidecar.refused_summary import RefusedSummary
from sidecar.settings import ParsedLists, SettingsService, networks
from sidecar.store import SqlStore, open_store
from sidecar.store.base import SecuritySettings, Store, StoreUnavailable
from sidecar.websocket_review import WebSocketReview

METRICS = web.AppKey("sidecar.metrics", Metrics)
LIVE = web.AppKey("sidecar.live", LiveSettings)
AUDIT = web.AppKey("sidecar.audit", AuditLog)
BLOCKED = web.AppKey("sidecar.blocked", BlockedAudit)
UPSTREAM = web.AppKey[UpstreamTransport]("sidecar.upstream")
STORE = web.AppKey[Store]("sidecar.store")
SETTINGS = web.AppKey("sidecar.settings", SettingsService)
MFA = web.AppKey("sidecar.mfa", MfaService)
IDENTITY_PROVIDER = web.AppKey("sidecar.identity_provider", IdentityRef)
TOKEN_REFUSALS = web.AppKey("sidecar.token_refusals", TokenRefusals)
#: Set when the process is draining (SIGTERM): /readyz answers 503 from then on.
DRAINING = web.AppKey("sidecar.draining", asyncio.Event)
HANDLERS = web.AppKey("sidecar.handlers", Handlers)
PROXY = web.AppKey("sidecar.proxy", Proxy)
IN_FLIGHT = web.AppKey("sidecar.in_flight", InFlight)
BACKGROUND = web.AppKey("sidecar.background", set[asyncio.Task[None]])
WEBSOCKET_REVIEW = web.AppKey("sidecar.websocket_review", WebSocketReview)

# The sidecar's own JSON API never needs large bodies; proxied bodies are streamed and
# limited separately by listen.max_body_size.
_OWN_ROUTES_MAX_BODY = 1024**2
_FREEZE_ABOVE_RULES = 1000


def build_app(
    config: Config, *, metrics: Metrics | None = None, store: Store | None = None
) -> web.Application:
    """The public application: the whole request pipeline for one config.

    ``store`` is opened from ``storage.url`` unless given (tests pass one to share it).
    """
    metrics = metrics or Metrics()
    # Until the store-held lists are loaded, requests are refused (live.loaded is False), so
    # the gate starts empty rather than parsing the YAML lists twice.
    live = LiveSettings(NetworkPolicy.build(config, allowlist=(), denylist=()), config)
    parsed = ParsedLists(config)
    store = store or open_store(config.storage.url, config.storage.encryption_key)
    if isinstance(store, SqlStore):
        store.observe(StoreMetrics(metrics))
    audit = AuditLog(config.audit.file, metrics.registry, store)
    blocked = BlockedAudit(audit)
    mfa_metrics = MfaMetrics(metrics.registry)
    service = MfaService(store=store, config=config, audit=audit, metrics=mfa_metrics)
    app = web.Application(client_max_size=_OWN_ROUTES_MAX_BODY)
    in_flight = InFlight()
    app[IN_FLIGHT] = in_flight

    def settings_changed(settings: SecuritySettings) -> None:
        swap_network_policy(
            app,
            NetworkPolicy.build(
                live.config,
                allowlist=parsed.networks(settings.ip_allowlist),
                denylist=parsed.networks(settings.ip_denylist),
            ),
        )
        live.loaded = True
        if len(settings.ip_allowlist) + len(settings.ip_denylist) > _FREEZE_ABOVE_RULES:
            # Long lists are 100,000s of objects that live as long as the process; moving
            # them out of the cyclic GC's reach keeps full collections (and so request
            # latency) independent of the list size.
            gc.collect()
            gc.freeze()

    settings = SettingsService(store, config, settings_changed, audit=audit)
    refusals = TokenRefusals(metrics.registry)
    identity = IdentityRef(build_identity_provider(config, refusals=refusals))
    session_storage = RotatingCookieStorage(
        list(config.mfa.session.secret_keys),
        cookie_name=config.mfa.session.cookie_name,
        max_age=int(config.mfa.verify_every),
        secure=config.mfa.session.secure,
    )
    refused = RefusedSummary()
    app.middlewares.extend(
        [
            request_log_middleware(metrics=metrics, in_flight=in_flight),
            client_ip_middleware(
                live=live, listener_scheme="https" if config.listen.tls is not None else "http"
            ),
            ip_gate_middleware(live=live, blocked=blocked),
            canonical_path_middleware(),
            session_middleware(session_storage),
            identity_middleware(live=live, identity=identity, refused=refused),
            mfa_gate_middleware(live=live, settings=settings, service=service, refused=refused),
        ]
    )
    app[METRICS] = metrics
    app[LIVE] = live
    app[AUDIT] = audit
    app[STORE] = store
    app[SETTINGS] = settings
    app[MFA] = service
    app[IDENTITY_PROVIDER] = identity
    app[TOKEN_REFUSALS] = refusals
    app[DRAINING] = asyncio.Event()
    app[BACKGROUND] = set()
    _count_ip_rules(metrics, live)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        try:
            await store.migrate()
            await settings.load()
        except StoreUnavailable as exc:
            # Keep serving: requests needing the store are refused (fail closed) until the
            # background loop reaches it.
            logging.getLogger("sidecar").error("store unavailable at start: %s", exc)
        settings.start()
        gauges = asyncio.get_running_loop().create_task(_refresh_user_gauges(service, settings))
        app[UPSTREAM] = AiohttpUpstream(config)
        yield
        gauges.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gauges
        await settings.stop()
        await app[UPSTREAM].close()
        # Requests have drained: providers retired by reloads are closed now, not 30 s on.
        background = list(_background_tasks(app))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await identity.provider.close()
        await store.close()
        audit.close()

    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(refused.lifecycle())
    # After the store's context: started once it is open, flushed before it closes.
    app.cleanup_ctx.append(blocked.lifecycle())
    app[BLOCKED] = blocked
    handlers = Handlers(config=config, service=service, settings=settings)
    app[HANDLERS] = handlers
    add_routes(app, handlers)
    add_admin_routes(app, handlers, metrics.registry)
    add_prefix_fallback(app, handlers)
    proxy = Proxy(
        transport=lambda: app[UPSTREAM],
        metrics=metrics,
        live=live,
        max_requests_per_client=config.upstream.max_requests_per_client,
        max_websockets_per_client=config.upstream.max_websockets_per_client,
        websocket_max_message=config.upstream.websocket_max_message,
        session_cookie=config.mfa.session.cookie_name,
        identity_headers=identity_header_names(config),
        prefix=config.mfa.path_prefix,
    )
    app[PROXY] = proxy
    # Relayed WebSockets are judged again while open: periodically, and at each settings
    # change (swap_network_policy, apply_config wake it).
    review = WebSocketReview(
        live=live, settings=settings, service=service, relays=lambda: proxy.open_websockets
    )
    app[WEBSOCKET_REVIEW] = review
    app.cleanup_ctx.append(review.lifecycle())
    # The catch-all: the pipeline's stages (IP gate, identity, MFA gate) guard it.
    register(app, "", [Route("*", "/{tail:.*}", proxy.handle, frozenset())])
    return app


#: Settings read once at start: changing them in a reload needs a restart (reported, not
#: applied). Everything else applies to the next request.
RESTART_ONLY = (
    ("listen", "host"),
    ("listen", "port"),
    ("listen", "tls"),
    ("listen", "keepalive_timeout"),
    ("listen", "drain_timeout"),
    ("admin",),
    ("workers",),
    ("upstream",),
    ("storage",),
    ("audit",),
    ("mfa", "path_prefix"),
    ("mfa", "session"),
)


def _part(config: Config, path: tuple[str, ...]) -> object:
    value: object = config
    for name in path:
        value = getattr(value, name)
    return value


_Model = TypeVar("_Model", bound=BaseModel)


def running_config(started: Config, current: Config) -> Config:
    """What a process that started with ``started`` runs while the file holds ``current``:
    every value of ``current``, except each ``RESTART_ONLY`` path, taken from ``started``.

    One rule for a reload (what it applies) and for a worker started later (a replacement
    after a crash): every process sharing the port runs exactly this, never the file's
    restart-only values. Pure; ``started`` may itself be a running config (its restart-only
    values are the start-up ones). Raises ConfigError when the combination breaks a rule
    between keys (a reloadable key naming what a restart-only one still holds): such a file
    is refused as any invalid file is.
    """
    merged = current
    for path in RESTART_ONLY:
        value = _part(started, path)
        if _part(current, path) != value:
            merged = _with_part(merged, path, value, kept=".".join(path))
    return merged


def _with_part(
    model: _Model, path: tuple[str, ...], value: object, *, kept: str, at: tuple[str, ...] = ()
) -> _Model:
    """``model`` with ``value`` at ``path``; each section on the way is validated again, so
    that its rules between keys hold for the combination."""
    name, rest = path[0], path[1:]
    if rest:
        inner = cast(BaseModel, getattr(model, name))
        value = _with_part(inner, rest, value, kept=kept, at=(*at, name))
    changed = model.model_copy(update={name: value})
    # Sections inside go in as they are (valid already, not validated again); other fields
    # as plain values, which their parsers accept back (CIDRs as text, durations as seconds).
    sections = {field for field, v in changed if isinstance(v, BaseModel)}
    data = changed.model_dump(mode="json", exclude=sections)
    data.update({field: getattr(changed, field) for field in sections})
    try:
        return type(model).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            [
                f"{format_path((*at, *error['loc']))}: {error['msg']} (with {kept} "
                "as the sidecar started, since changing it needs a restart)"
                for error in exc.errors()
            ]
        ) from None


async def apply_config(app: web.Application, new: Config) -> list[str]:
    """Swap a validated config into a running app; returns the keys that need a restart.

    What runs is ``running_config(running, new)``: restart-only keys keep their start-up
    values everywhere (an identity provider built after a reload still asks the upstream
    the proxy uses). ConfigError when that combination is invalid; nothing changed then.

    Applied at once: IP lists and MFA policy when ``security.managed_by: config`` (written to
    the store, so every replica follows), trusted proxies and the client-IP header, identity
    settings (a new provider; the old one is closed after in-flight requests had time to
    finish), MFA settings (exempt paths, lockout, verify_every for new checks, origins),
    the body size cap and the log level.
    """
    live = app[LIVE]
    old = live.config
    restart = [".".join(path) for path in RESTART_ONLY if _part(old, path) != _part(new, path)]
    new = running_config(old, new)
    # First what can fail (a JWT key that does not fit, the store), so that a failed reload
    # leaves everything as it was; then the swaps, which cannot fail.
    provider = (
        build_identity_provider(new, refusals=app[TOKEN_REFUSALS])
        if new.identity != old.identity
        else None
    )
    settings = app[SETTINGS]
    settings.reconfigure(new)
    try:
        await settings.load()  # managed_by config: writes the YAML's lists and policy
    except BaseException:
        settings.reconfigure(old)
        if provider is not None:
            await provider.close()
        raise
    live.config = new
    app[MFA].config = new
    app[HANDLERS].reconfigure(new)
    if new.logging != old.logging:
        configure_logging(new.logging.level, new.logging.format)
    if provider is not None:
        ref = app[IDENTITY_PROVIDER]
        retired = ref.provider
        ref.provider = provider

        async def close_later() -> None:
            try:
                await asyncio.sleep(30)  # let requests that hold the old provider finish
            finally:
                # Also when the app stops first: the lifecycle cancels this task.
                await retired.close()

        task = asyncio.get_running_loop().create_task(close_later())
        _background_tasks(app).add(task)
        task.add_done_callback(_background_tasks(app).discard)
    current = settings.current
    if current is not None and new.network != old.network:
        swap_network_policy(
            app,
            NetworkPolicy.build(
                new,
                allowlist=networks(current.ip_allowlist),
                denylist=networks(current.ip_denylist),
            ),
        )
    app[WEBSOCKET_REVIEW].wake()  # exempt paths, verify_every... apply to open WebSockets
    return restart


def _background_tasks(app: web.Application) -> set[asyncio.Task[None]]:
    return app[BACKGROUND]


USER_GAUGES_SECONDS = 30.0


async def _refresh_user_gauges(service: MfaService, settings: SettingsService) -> None:
    """``sidecar_mfa_users{state}`` from the store, so a rollout can be watched."""
    while True:
        current = settings.current
        if current is not None:
            try:
                await service.refresh_user_gauges(
                    policy=MfaPolicy(current.mfa_policy),
                    grace_period=current.grace_period_seconds,
                )
            except StoreUnavailable as exc:
                logging.getLogger("sidecar").warning("user gauges not refreshed: %s", exc)
            except Exception:
                # Whatever went wrong this time, the gauges must keep being refreshed.
                logging.getLogger("sidecar").exception("user gauges not refreshed")
        await asyncio.sleep(USER_GAUGES_SECONDS)


def _count_ip_rules(metrics: Metrics, live: LiveSettings) -> None:
    metrics.ip_rules.labels("allowlist").set(len(live.network.gate.allowlist))
    metrics.ip_rules.labels("denylist").set(len(live.network.gate.denylist))


def swap_network_policy(app: web.Application, policy: NetworkPolicy) -> None:
    """Replace the live IP lists and trusted proxies atomically (reloads, Security page and
    every other settings change), and judge the open WebSockets again at once."""
    app[LIVE].swap_network(policy)
    _count_ip_rules(app[METRICS], app[LIVE])
    app[WEBSOCKET_REVIEW].wake()


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
        if not public[LIVE].loaded or not public[SETTINGS].healthy:
            return web.json_response({"ready": False, "reason": "store unavailable"}, status=503)
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
