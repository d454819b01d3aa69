"""The organization-level admin API under the prefix: security settings, audit log, resets.

Who may call it: a privileged role (``identity.admin_roles``) whose sidecar session verified MFA
within the last 10 minutes (step-up); anyone else gets 403 (``forbidden``, or
``step_up_required`` with where to verify). Writes also need the CSRF token.

``PUT /api/admin/security`` validates every list line and reports each bad one; refuses a
change that would block the caller's own current address unless ``confirm_lockout``; and uses
optimistic concurrency (``version`` must be the one the caller edited: 409 if it moved).
With ``security.managed_by: config`` the settings are read-only here (409).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from typing import Any, cast

from aiohttp import web

from sidecar.answers import json_error
from sidecar.config import MAX_DURATION_SECONDS, parse_cidr, parse_duration
from sidecar.decision import Decision
from sidecar.identity.base import is_privileged
from sidecar.mfa import pages, security_pages
from sidecar.mfa.policy import MfaPolicy, is_required, is_tightening
from sidecar.mfa.routes import Caller, Handlers, methods_json
from sidecar.net import IpGate
from sidecar.settings import networks, settings_changes
from sidecar.state import CLIENT_IP
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


class AdminHandlers:
    def __init__(self, handlers: Handlers) -> None:
        self.h = handlers
        self.config = handlers.config
        self.service = handlers.service
        self.settings = handlers.settings

    async def _admin(self, request: web.Request, *, write: bool) -> Caller | web.Response:
        caller = await self.h.caller(request)
        if isinstance(caller, web.Response):
            return caller
        if not is_privileged(caller.identity, self.config.identity.admin_roles):
            return json_error(403, "forbidden", "Only organization admins can do this.")
        if write and (refused := self.h.cross_site(request, caller.session)):
            return refused
        if not self.h.stepped_up(caller):
            return self.h.step_up_required(f"{self.h.prefix}/security")
        return caller

    async def get_security(self, request: web.Request) -> web.Response:
        caller = await self._admin(request, write=False)
        if isinstance(caller, web.Response):
            return caller
        current = self.settings.current
        if current is None:
            return json_error(503, "store_unavailable", "Security settings are not loaded.")
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
        not enrolled, grace over), not required."""
        current = self.settings.current
        if current is None:
            raise StoreUnavailable("settings not loaded")
        new_epoch = is_tightening(MfaPolicy(current.mfa_policy), policy)
        starts = {} if new_epoch else await self.service.store.grace_starts(current.policy_epoch)
        now = self.service.now()
        admin_roles = {r.casefold() for r in self.config.identity.admin_roles}
        counts = {"users": 0, "enrolled": 0, "grace": 0, "blocked": 0, "not_required": 0}
        enrolled = await self.service.store.enrolled_user_keys()
        for user in await self.service.store.list_users():
            counts["users"] += 1
            if user.user_id in enrolled:
                counts["enrolled"] += 1
            elif not is_required(policy, (user.role or "").casefold() in admin_roles):
                counts["not_required"] += 1
            else:
                start = starts.get(user.user_id, now)
                in_grace = now < start + timedelta(seconds=grace_period)
                counts["grace" if in_grace else "blocked"] += 1
        return counts

    async def preview_handler(self, request: web.Request) -> web.Response:
        caller = await self._admin(request, write=False)
        if isinstance(caller, web.Response):
            return caller
        policy = request.query.get("mfa_policy", "")
        if policy not in _POLICIES:
            return json_error(400, "invalid", f"mfa_policy must be one of {', '.join(_POLICIES)}")
        try:
            grace = parse_duration(request.query.get("grace_period", "72h"))
        except ValueError:
            return json_error(400, "invalid", "grace_period is not a duration")
        try:
            counts = await self.preview(MfaPolicy(policy), grace)
        except StoreUnavailable:
            return json_error(503, "store_unavailable", "Security checks are unavailable.")
        return web.json_response(counts, headers={"Cache-Control": "no-store"})

    async def put_security(self, request: web.Request) -> web.Response:
        caller = await self._admin(request, write=True)
        if isinstance(caller, web.Response):
            return caller
        if self.settings.managed_by == "config":
            return json_error(
                409,
                "managed_by_config",
                "These settings come from the deployment's YAML (security.managed_by: config).",
            )
        data = await self.h.body(request)
        if isinstance(data, web.Response):
            return data
        current = self.settings.current
        if current is None:
            return json_error(503, "store_unavailable", "Security settings are not loaded.")
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
            return json_error(
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
                return json_error(
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
            return json_error(503, "store_unavailable", "The change could not be saved.")
        if saved is None:
            return json_error(
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

    async def audit_log(self, request: web.Request) -> web.StreamResponse:
        caller = await self._admin(request, write=False)
        if isinstance(caller, web.Response):
            return caller
        try:
            limit = min(int(request.query.get("limit", "100")), MAX_AUDIT_PAGE)
            before = int(request.query["before"]) if "before" in request.query else None
        except ValueError:
            return json_error(400, "invalid", "limit and before must be integers")
        if before is not None and not 0 < before < 2**62:
            return json_error(400, "invalid", "before must be a record sequence number")
        try:
            entries = await self.service.store.audit_entries(
                limit=max(limit, 1),
                action=request.query.get("action") or None,
                actor=request.query.get("actor") or None,
                before_seq=before,
            )
        except StoreUnavailable:
            return json_error(503, "store_unavailable", "The audit log is unavailable.")
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
            passkeys = await self.service.store.passkeys(caller.identity.user_id)
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

    async def audit_page(self, request: web.Request) -> web.Response:
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

    async def reset_mfa(self, request: web.Request) -> web.Response:
        caller = await self._admin(request, write=True)
        if isinstance(caller, web.Response):
            return caller
        target = request.match_info["id"]
        if not valid_user_id(target):
            return json_error(400, "invalid", "That is not a user id.")
        try:
            removed = await self.service.reset(target, caller.actor)
        except StoreUnavailable:
            return json_error(503, "store_unavailable", "The reset could not be saved.")
        return web.json_response(
            {"user": target, "reset": removed}, headers={"Cache-Control": "no-store"}
        )


def valid_user_id(text: str) -> bool:
    """A user id as a console reports it: not blank, printable, of sane length."""
    return bool(text.strip()) and len(text) <= 256 and text.isprintable()


def _csv_safe(value: object) -> str:
    """Spreadsheet formula injection guard: a cell must not start with = + - @ (OWASP)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def add_admin_routes(app: web.Application, handlers: Handlers) -> AdminHandlers:
    admin = AdminHandlers(handlers)
    p = handlers.prefix
    r = app.router
    r.add_get(f"{p}/security", admin.security_page)
    r.add_get(f"{p}/audit", admin.audit_page)
    r.add_get(f"{p}/api/admin/security", admin.get_security)
    r.add_put(f"{p}/api/admin/security", admin.put_security)
    r.add_get(f"{p}/api/admin/security/preview", admin.preview_handler)
    r.add_get(f"{p}/api/admin/audit", admin.audit_log)
    r.add_post(f"{p}/api/admin/users/{{id}}/reset-mfa", admin.reset_mfa)
    return admin
