"""The organization-level admin API under the prefix: security settings, audit log, resets.

Who may call it: a privileged role (``identity.admin_roles``) whose sidecar session verified MFA
within the last 10 minutes (step-up); anyone else gets 403 (``forbidden``, or
``step_up_required`` with where to verify). Writes also need the CSRF token.

``PUT /api/admin/security`` validates every list line and reports each bad one; refuses a
change that would block the caller's own current address unless ``confirm_lockout``; and uses
optimistic concurrency (``version`` must be the one the caller edited: 409 if it moved).
With ``security.managed_by: config`` the settings are read-only here (409).

Every refusal of a signed-in caller on these routes (forbidden, CSRF, step-up missing, the
lock-out guard, a stale version, invalid input, read-only settings) is audited as
``admin.refused`` with the reason, the route and the user it was aimed at, so a reviewer sees
attempts and not only successes: the first per caller, reason and route at once, the rest
counted and written by a flush (``sidecar.mfa.refusals``), so refusals cannot be turned into
a flood of store writes.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.answers import Refusal
from sidecar.config import MAX_DURATION_SECONDS, Config, parse_cidr, parse_duration
from sidecar.decision import Decision
from sidecar.identity.base import is_privileged, valid_user_id
from sidecar.mfa import pages, security_pages
from sidecar.mfa.policy import MfaPolicy
from sidecar.mfa.refusals import RefusalAudit, RefusalKey
from sidecar.mfa.routes import (
    Caller,
    Guard,
    Handlers,
    Route,
    methods_json,
    register,
    store_unavailable,
)
from sidecar.net import IpGate
from sidecar.settings import networks, settings_changes
from sidecar.state import CLIENT_IP, IDENTITY
from sidecar.store.base import SecuritySettings, StoreUnavailable

MAX_AUDIT_PAGE = 1000
_POLICIES = tuple(p.value for p in MfaPolicy)


def settings_json(settings: SecuritySettings, managed_by: str) -> dict[str, Any]:
    return {
        "mfa_policy": settings.mfa_policy,
        "grace_period_seconds": settings.grace_period_seconds,
        "ip_allowlist": list(settings.ip_allowlist),
        "ip_denylist": list(settings.ip_denylist),
        "managed_by": managed_by,
        "version": settings.version,
        "updated_by": settings.updated_by,
        "updated_at": settings.updated_at.isoformat(),
    }


def validate_lines(field: str, value: object) -> tuple[list[str], list[dict[str, Any]]]:
    """Normalised CIDR lines and one error per bad line (1-based line numbers).

    Accepts a list of strings or one string with a CIDR per line; blank lines and ``#``
    comments are ignored; a bare address means /32 or /128.
    """
    if isinstance(value, str):
        raw: list[object] = list(value.splitlines())
    elif isinstance(value, list):
        raw = list(value)
    else:
        return [], [{"field": field, "line": None, "value": None, "reason": "must be a list"}]
    good: list[str] = []
    errors: list[dict[str, Any]] = []
    for number, item in enumerate(raw, start=1):
        if not isinstance(item, str):
            errors.append(
                {"field": field, "line": number, "value": item, "reason": "is not a string"}
            )
            continue
        text = item.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            good.append(str(parse_cidr(text)))
        except ValueError as exc:  # PydanticCustomError is a ValueError
            reason = str(exc)
            errors.append({"field": field, "line": number, "value": item, "reason": reason})
    return good, errors


AdminHandler = Callable[["AdminHandlers", web.Request], Awaitable[web.StreamResponse]]


def audited_refusals(handler: AdminHandler) -> AdminHandler:
    """Audit every refusal (a 4xx other than 401) of a signed-in caller on an admin route."""

    @functools.wraps(handler)
    async def wrapper(self: AdminHandlers, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except web.HTTPException as refusal:
            identity = request.get(IDENTITY)
            if identity is not None and 400 <= refusal.status < 500 and refusal.status != 401:
                await self.audit_refusal(request, identity.user_id, refusal)
            raise

    return wrapper


class AdminHandlers:
    def __init__(self, handlers: Handlers, refusals: RefusalAudit) -> None:
        self.h = handlers
        self.service = handlers.service
        self.settings = handlers.settings
        self.refusals = refusals

    @property
    def config(self) -> Config:
        """The running configuration (a reload swaps it; never a copy taken at start)."""
        return self.h.config

    async def audit_refusal(
        self, request: web.Request, actor: str, refusal: web.HTTPException
    ) -> None:
        reason = getattr(refusal, "error", None) or f"http_{refusal.status}"
        route = request.match_info.route.resource
        where = route.canonical if route is not None else request.path
        client_ip = request.get(CLIENT_IP)
        await self.refusals.refused(
            RefusalKey(actor, reason, where),
            method=request.method,
            status=refusal.status,
            target=request.match_info.get("id"),
            client_ip=str(client_ip) if client_ip is not None else None,
        )

    async def _admin(self, request: web.Request, *, write: bool) -> Caller:
        caller = await self.h.caller(request)
        if not is_privileged(caller.identity, self.config.identity.admin_roles):
            raise Refusal(403, "forbidden", "Only organization admins can do this.")
        if write:
            self.h.check_same_site(request, caller.session)
        if not self.h.stepped_up(caller):
            raise self.h.step_up_required(f"{self.h.prefix}/security")
        return caller

    def loaded(self) -> SecuritySettings:
        current = self.settings.current
        if current is None:
            raise store_unavailable("Security settings are not loaded.")
        return current

    @audited_refusals
    async def get_security(self, request: web.Request) -> web.StreamResponse:
        await self._admin(request, write=False)
        current = self.loaded()
        body = settings_json(current, self.settings.managed_by)
        try:
            body["preview"] = await self.preview(
                MfaPolicy(current.mfa_policy), current.grace_period_seconds
            )
        except StoreUnavailable:
            body["preview"] = None
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def preview(self, policy: MfaPolicy, grace_period: float) -> dict[str, int]:
        """How known users would fare under ``policy``: enrolled, in grace, blocked (required,
        not enrolled, grace over), not required. Users the change newly requires would start
        a clock now."""
        current = self.loaded()
        standings = await self.service.standings(
            policy=policy, grace_period=grace_period, current=MfaPolicy(current.mfa_policy)
        )
        counts = {"users": len(standings), "enrolled": 0, "grace": 0, "blocked": 0}
        counts["not_required"] = 0
        names = {"enrolled": "enrolled", "grace": "grace", "overdue": "blocked"}
        for standing in standings.values():
            counts[names.get(standing.value, "not_required")] += 1
        return counts

    @audited_refusals
    async def preview_handler(self, request: web.Request) -> web.StreamResponse:
        await self._admin(request, write=False)
        policy = request.query.get("mfa_policy", "")
        if policy not in _POLICIES:
            raise Refusal(400, "invalid", f"mfa_policy must be one of {', '.join(_POLICIES)}")
        try:
            grace = parse_duration(request.query.get("grace_period", "72h"))
        except ValueError:
            raise Refusal(400, "invalid", "grace_period is not a duration") from None
        counts = await self.preview(MfaPolicy(policy), grace)
        return web.json_response(counts, headers={"Cache-Control": "no-store"})

    @audited_refusals
    async def put_security(self, request: web.Request) -> web.StreamResponse:
        caller = await self._admin(request, write=True)
        if self.settings.managed_by == "config":
            raise Refusal(
                409,
                "managed_by_config",
                "These settings come from the deployment's YAML (security.managed_by: config).",
            )
        data = await self.h.body(request)
        current = self.loaded()
        errors: list[dict[str, Any]] = []
        policy = data.get("mfa_policy", current.mfa_policy)
        if policy not in _POLICIES:
            errors.append(
                {"field": "mfa_policy", "value": policy, "reason": f"must be one of {_POLICIES}"}
            )
        grace = data.get("grace_period_seconds", current.grace_period_seconds)
        if "grace_period" in data:
            try:
                grace = parse_duration(data["grace_period"])
            except ValueError:
                errors.append(
                    {"field": "grace_period", "value": data["grace_period"], "reason": "bad"}
                )
        if (
            isinstance(grace, bool)
            or not isinstance(grace, int | float)
            or not 0 <= grace <= MAX_DURATION_SECONDS  # also refuses NaN and infinity
        ):
            errors.append(
                {
                    "field": "grace_period_seconds",
                    "value": grace,
                    "reason": f"must be a number of seconds from 0 to {MAX_DURATION_SECONDS:.0f}",
                }
            )
            grace = 0.0
        allow, allow_errors = validate_lines(
            "ip_allowlist", data.get("ip_allowlist", list(current.ip_allowlist))
        )
        deny, deny_errors = validate_lines(
            "ip_denylist", data.get("ip_denylist", list(current.ip_denylist))
        )
        errors += allow_errors + deny_errors
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            errors.append({"field": "version", "value": version, "reason": "required (int)"})
        if errors:
            raise Refusal(
                400,
                "invalid",
                f"{len(errors)} value(s) need fixing.",
                errors=json.loads(json.dumps(errors, default=str)),
            )
        expected_version = cast(int, version)  # checked above
        client_ip = request.get(CLIENT_IP)
        if client_ip is not None and data.get("confirm_lockout") is not True:
            verdict = IpGate(allowlist=networks(tuple(allow)), denylist=networks(tuple(deny)))
            decided = verdict.decide(client_ip)
            if decided.decision is not Decision.ALLOWED:
                raise Refusal(
                    409,
                    "would_lock_you_out",
                    f"This change would block your current address {client_ip}"
                    + (f" ({decided.list_name} {decided.rule})." if decided.rule else ".")
                    + " Send confirm_lockout: true to apply it anyway.",
                    client_ip=str(client_ip),
                )
        try:
            saved = await self.settings.change(
                mfa_policy=str(policy),
                grace_period_seconds=float(grace),
                ip_allowlist=tuple(allow),
                ip_denylist=tuple(deny),
                actor=caller.identity.user_id,
                expected_version=expected_version,
            )
        except StoreUnavailable:
            raise store_unavailable("The change could not be saved.") from None
        if saved is None:
            raise Refusal(
                409,
                "conflict",
                "Someone else changed these settings since you loaded them. Reload and retry.",
            )
        changes = settings_changes(current, saved)
        await self.service.audit.record(
            "security.settings.changed",
            actor=caller.actor.user,
            client_ip=caller.actor.client_ip,
            target="security",
            version=saved.version,
            changes=changes,
        )
        return web.json_response(
            settings_json(saved, self.settings.managed_by), headers={"Cache-Control": "no-store"}
        )

    @audited_refusals
    async def audit_log(self, request: web.Request) -> web.StreamResponse:
        await self._admin(request, write=False)
        try:
            limit = min(int(request.query.get("limit", "100")), MAX_AUDIT_PAGE)
            before = int(request.query["before"]) if "before" in request.query else None
        except ValueError:
            raise Refusal(400, "invalid", "limit and before must be integers") from None
        if before is not None and not 0 < before < 2**62:
            raise Refusal(400, "invalid", "before must be a record sequence number")
        try:
            entries = await self.service.store.audit.entries(
                limit=max(limit, 1),
                action=request.query.get("action") or None,
                actor=request.query.get("actor") or None,
                before_seq=before,
            )
        except StoreUnavailable:
            raise store_unavailable("The audit log is unavailable.") from None
        rows = [
            {
                "seq": e.seq,
                "time": e.time.isoformat(),
                "actor": e.actor,
                "client_ip": e.client_ip,
                "action": e.action,
                "target": e.target,
                "outcome": e.outcome,
                "details": json.loads(e.details) if e.details else {},
                "hash": e.hash,
            }
            for e in entries
        ]
        if request.query.get("format") == "csv":
            out = io.StringIO()
            writer = csv.writer(out)
            columns = ["seq", "time", "actor", "client_ip", "action", "target", "outcome"]
            writer.writerow([*columns, "details", "hash"])
            for row in rows:
                writer.writerow(
                    [
                        *(_csv_safe(row[c]) for c in columns),
                        _csv_safe(json.dumps(row["details"])),
                        row["hash"],
                    ]
                )
            return web.Response(
                text=out.getvalue(),
                content_type="text/csv",
                headers={
                    "Content-Disposition": 'attachment; filename="sidecar-audit.csv"',
                    "Cache-Control": "no-store",
                },
            )
        return web.json_response({"entries": rows}, headers={"Cache-Control": "no-store"})

    async def security_page(self, request: web.Request) -> web.Response:
        async def render(caller: Caller) -> str:
            privileged = is_privileged(caller.identity, self.config.identity.admin_roles)
            passkeys = await self.service.store.mfa.passkeys(caller.identity.user_id)
            settings: dict[str, Any] | None = None
            preview: dict[str, int] | None = None
            step_up_url: str | None = None
            current = self.settings.current
            if privileged and not self.h.stepped_up(caller):
                step_up_url = f"{self.h.prefix}/verify?next={self.h.prefix}/security"
            elif privileged and current is not None:
                settings = settings_json(current, self.settings.managed_by)
                try:
                    preview = await self.preview(
                        MfaPolicy(current.mfa_policy), current.grace_period_seconds
                    )
                except StoreUnavailable:
                    preview = None
            lockout = self.config.mfa.lockout
            return security_pages.render_security(
                self.h.context(request, caller),
                privileged=privileged,
                methods=methods_json(caller, passkeys),
                settings=settings,
                preview=preview,
                session_lifetime=f"Set by {self.config.mfa.rp_name}",
                verify_every=security_pages.describe_duration(self.config.mfa.verify_every),
                lockout=security_pages.describe_lockout(
                    lockout.max_failures, lockout.window, lockout.ban
                ),
                step_up_url=step_up_url,
            )

        return await self.h.page(request, render)

    @audited_refusals
    async def audit_page(self, request: web.Request) -> web.StreamResponse:
        async def render(caller: Caller) -> str:
            if not is_privileged(caller.identity, self.config.identity.admin_roles):
                raise web.HTTPForbidden(
                    text=pages.render_error(
                        "Admins only",
                        "Only organization admins can see the audit log.",
                        prefix=self.h.prefix,
                    ),
                    content_type="text/html",
                    headers={"Cache-Control": "no-store"},
                )
            if not self.h.stepped_up(caller):
                raise web.HTTPSeeOther(f"{self.h.prefix}/verify?next={self.h.prefix}/audit")
            return security_pages.render_audit(self.h.context(request, caller))

        return await self.h.page(request, render)

    @audited_refusals
    async def reset_mfa(self, request: web.Request) -> web.StreamResponse:
        caller = await self._admin(request, write=True)
        target = request.match_info["id"]
        if not valid_user_id(target):
            raise Refusal(400, "invalid", "That is not a user id.")
        try:
            removed = await self.service.reset(target, caller.actor)
        except StoreUnavailable:
            raise store_unavailable("The reset could not be saved.") from None
        return web.json_response(
            {"user": target, "reset": removed}, headers={"Cache-Control": "no-store"}
        )


def _csv_safe(value: object) -> str:
    """Spreadsheet formula injection guard: a cell must not start with = + - @ (OWASP)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def add_admin_routes(
    app: web.Application, handlers: Handlers, registry: CollectorRegistry
) -> AdminHandlers:
    refusals = RefusalAudit(handlers.service.audit, registry, time.monotonic)
    app.cleanup_ctx.append(refusals.lifecycle())
    admin = AdminHandlers(handlers, refusals)
    admin_read = frozenset({Guard.SIGNED_IN, Guard.ADMIN, Guard.STEP_UP})
    admin_write = admin_read | {Guard.SAME_SITE}
    register(
        app,
        handlers.prefix,
        [
            # Everyone's own MFA; the organization's part only for verified admins.
            Route("GET", "/security", admin.security_page, frozenset({Guard.SIGNED_IN})),
            Route("GET", "/audit", admin.audit_page, admin_read),
            Route("GET", "/api/admin/security", admin.get_security, admin_read),
            Route("PUT", "/api/admin/security", admin.put_security, admin_write),
            Route("GET", "/api/admin/security/preview", admin.preview_handler, admin_read),
            Route("GET", "/api/admin/audit", admin.audit_log, admin_read),
            Route("POST", "/api/admin/users/{id}/reset-mfa", admin.reset_mfa, admin_write),
        ],
    )
    return admin
