"""The sidecar's own routes under ``mfa.path_prefix``: setup and verify pages, their JSON API.

Every route needs a console identity (401 otherwise). Every state-changing call needs the
session's CSRF token in ``X-CSRF-Token`` and must not come from another site (``Origin`` in
``mfa.origin``, ``Sec-Fetch-Site`` same-origin when the browser sends them). Answers are
``Cache-Control: no-store``: some carry recovery codes or secrets.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp_session import Session
from webauthn.helpers import bytes_to_base64url

from sidecar.answers import json_error
from sidecar.config import Config
from sidecar.identity.base import Identity, is_privileged
from sidecar.mfa import pages
from sidecar.mfa.passkeys import (
    AUTHENTICATE,
    REGISTER,
    Begun,
    PasskeyError,
    Passkeys,
    credential_id_from,
)
from sidecar.mfa.policy import MfaPolicy, is_required
from sidecar.mfa.service import Actor, MfaService
from sidecar.mfa.session import (
    csrf_token,
    mark_verified,
    pop_challenge,
    remember_challenge,
    session_for,
    session_id,
    verified_recently,
    view,
)
from sidecar.middleware.mfa_gate import binding_of
from sidecar.paths import is_local_path
from sidecar.settings import SettingsService
from sidecar.state import CLIENT_IP, IDENTITY, LOG_PATH
from sidecar.store.base import MfaState, PasskeyRecord, StoreUnavailable

log = logging.getLogger("sidecar.mfa")

#: How recent a verification must be for sensitive changes (step-up).
STEP_UP_SECONDS = 600.0

_NO_STORE = {"Cache-Control": "no-store"}


def safe_next(value: str | None, prefix: str) -> str:
    """A same-origin relative path to go to after setup or verification, else ``/``.

    Local means what ``paths.is_local_path`` says (the one rule for redirect targets); on top
    of it, the sidecar's own pages are refused (no loops), except the pages that send a user
    to verify for a step-up.
    """
    if value is None or not is_local_path(value):
        return "/"
    parts = urlsplit(value)
    if parts.path in (f"{prefix}/security", f"{prefix}/audit"):
        return value  # back to the page that sent the user to verify (step-up)
    if parts.path == prefix or parts.path.startswith(prefix + "/"):
        return "/"
    return value


@dataclass(slots=True)
class Caller:
    identity: Identity
    session: Session
    binding: str
    actor: Actor
    state: MfaState


def methods_json(caller: Caller, passkeys: list[PasskeyRecord]) -> dict[str, Any]:
    """The user's methods as the status API and the Security page show them."""
    return {
        "totp": caller.state.totp,
        "passkeys": [
            {
                "id": bytes_to_base64url(p.credential_id),
                "name": p.name,
                "created_at": p.created_at.isoformat(),
                "last_used_at": p.last_used_at.isoformat() if p.last_used_at else None,
            }
            for p in passkeys
        ],
        "recovery_codes_left": caller.state.recovery_codes_left,
    }


class Handlers:
    def __init__(self, *, config: Config, service: MfaService, settings: SettingsService) -> None:
        self.service = service
        self.settings = settings
        self.prefix = config.mfa.path_prefix
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config (the prefix stays: routes are registered under it)."""
        self.config = config
        self._origins = set(config.mfa.origin)
        self.passkeys = Passkeys(store=self.service.store, config=config)

    # --- plumbing --------------------------------------------------------------------------

    async def caller(self, request: web.Request) -> Caller | web.Response:
        identity = request.get(IDENTITY)
        if identity is None:
            return json_error(401, "unauthenticated", "Sign in to the console first.")
        binding = binding_of(identity.credential_hash)
        session = await session_for(request, user=identity.user_id, binding=binding)
        client_ip = request.get(CLIENT_IP)
        try:
            state = await self.service.state(identity.user_id)
            await self.service.touch(identity.user_id, email=identity.email, role=identity.role)
        except StoreUnavailable:
            return json_error(503, "store_unavailable", "Security checks are unavailable.")
        return Caller(
            identity,
            session,
            binding,
            Actor(identity.user_id, str(client_ip) if client_ip else None),
            state,
        )

    async def writer(self, request: web.Request) -> Caller | web.Response:
        """The caller of a state-changing call, or the answer refusing it (401, CSRF)."""
        caller = await self.caller(request)
        if isinstance(caller, web.Response):
            return caller
        return self.cross_site(request, caller.session) or caller

    def cross_site(self, request: web.Request, session: Session) -> web.Response | None:
        """The CSRF answer for a state-changing call, or None when it may proceed."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in self._origins:
            return json_error(403, "csrf", "Request from another site refused.")
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return json_error(403, "csrf", "Request from another site refused.")
        token = request.headers.get("X-CSRF-Token", "")
        if not token or not hmac.compare_digest(token.encode(), csrf_token(session).encode()):
            return json_error(403, "csrf", "Missing or wrong CSRF token; reload the page.")
        return None

    def verified(self, caller: Caller) -> bool:
        return view(caller.session).verified_for(
            user=caller.identity.user_id,
            binding=caller.binding,
            generation=caller.state.mfa_generation,
            now=time.time(),
            verify_every=self.config.mfa.verify_every,
        )

    def stepped_up(self, caller: Caller) -> bool:
        return self.verified(caller) and verified_recently(
            caller.session, now=time.time(), within=STEP_UP_SECONDS
        )

    def step_up_required(self, next_path: str = "/") -> web.Response:
        return json_error(
            403,
            "step_up_required",
            "Confirm it's you again before changing your security settings.",
            location=f"{self.prefix}/verify?next={next_path}",
        )

    async def body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if not request.body_exists:
            return {}
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
            # RecursionError: "[[[[..." nested deeper than the JSON parser can follow.
            return json_error(400, "bad_request", "The request body is not valid JSON.")
        if not isinstance(data, dict):
            return json_error(400, "bad_request", "The request body must be a JSON object.")
        return data

    def required(self, identity: Identity) -> bool:
        current = self.settings.current
        if current is None:
            return False
        return is_required(
            MfaPolicy(current.mfa_policy), is_privileged(identity, self.config.identity.admin_roles)
        )

    async def grace_deadline(self, caller: Caller) -> str | None:
        current = self.settings.current
        if current is None or caller.state.enrolled or not self.required(caller.identity):
            return None
        start = await self.service.grace_started(caller.identity.user_id, current.policy_epoch)
        return (start + timedelta(seconds=current.grace_period_seconds)).isoformat()

    def context(self, request: web.Request, caller: Caller) -> pages.PageContext:
        return pages.PageContext(
            prefix=self.prefix,
            csrf_token=csrf_token(caller.session),
            user=caller.identity.email or caller.identity.user_id,
            role=caller.identity.role,
            next_path=safe_next(request.query.get("next"), self.prefix),
            app_name=self.config.mfa.rp_name,
        )

    # --- JSON API --------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        caller = await self.caller(request)
        if isinstance(caller, web.Response):
            return caller
        try:
            passkeys = await self.service.store.passkeys(caller.identity.user_id)
            deadline = await self.grace_deadline(caller)
        except StoreUnavailable:
            return json_error(503, "store_unavailable", "Security checks are unavailable.")
        return web.json_response(
            {
                "methods": methods_json(caller, passkeys),
                "user": caller.identity.user_id,
                "email": caller.identity.email,
                "role": caller.identity.role,
                "required": self.required(caller.identity),
                "enrolled": caller.state.enrolled,
                "grace_deadline": deadline,
                "verified": self.verified(caller),
                "csrf_token": csrf_token(caller.session),
            },
            headers=_NO_STORE,
        )

    async def totp_begin(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        if caller.state.totp:
            return json_error(
                409, "already_enrolled", "An authenticator app is already set up; remove it first."
            )
        if caller.state.enrolled and not self.stepped_up(caller):
            return self.step_up_required(f"{self.prefix}/setup")
        account = caller.identity.email or caller.identity.user_id
        secret, uri, svg = await self.service.begin_totp(caller.identity.user_id, account)
        return web.json_response(
            {"secret": secret, "otpauth_uri": uri, "qr_svg": svg}, headers=_NO_STORE
        )

    async def totp_finish(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        data = await self.body(request)
        if isinstance(data, web.Response):
            return data
        code = data.get("code")
        if not isinstance(code, str):
            return json_error(400, "bad_request", "Enter the 6-digit code from your app.")
        first = not caller.state.enrolled
        if not await self.service.finish_totp(caller.identity.user_id, code, caller.actor):
            return json_error(
                400, "invalid_code", "That code didn't match. Check your app and try again."
            )
        return await self._enrolled(request, caller, first=first)

    async def _enrolled(self, request: web.Request, caller: Caller, *, first: bool) -> web.Response:
        """After a method was added: recovery codes on the first enrollment only (shown
        once), and a new, verified session."""
        codes = (
            await self.service.new_recovery_codes(caller.identity.user_id, caller.actor, first=True)
            if first
            else None
        )
        return await self._verified_answer(
            request, caller, {"recovery_codes": codes, "verified": True}
        )

    def _ceremony(self, caller: Caller, purpose: str, begun: Begun) -> web.Response:
        """Remember the challenge in the session and answer the options JSON."""
        remember_challenge(caller.session, purpose, begun.challenge_id)
        return web.Response(
            text=begun.options_json, content_type="application/json", headers=_NO_STORE
        )

    async def _verified_answer(
        self, request: web.Request, caller: Caller, payload: dict[str, Any]
    ) -> web.Response:
        """Answer a successful enrollment or verification on a brand-new session."""
        state = await self.service.state(caller.identity.user_id)
        session = await mark_verified(
            request,
            user=caller.identity.user_id,
            binding=caller.binding,
            generation=state.mfa_generation,
        )
        payload["csrf_token"] = csrf_token(session)
        return web.json_response(payload, headers=_NO_STORE)

    async def _verify(
        self,
        request: web.Request,
        method: str,
        check: Callable[[Caller, str], Awaitable[bool]],
    ) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        data = await self.body(request)
        if isinstance(data, web.Response):
            return data
        code = data.get("code")
        if not isinstance(code, str) or not code.strip():
            return json_error(400, "bad_request", "Enter a code.")
        try:
            lockout = await self.service.lockout(caller.identity.user_id, caller.actor.client_ip)
            if lockout.locked_until is not None:
                self.service.metrics.verifications_total.labels(method, "locked").inc()
                return _locked(lockout.locked_until.isoformat())
            if not await check(caller, code):
                status = await self.service.failed(method, caller.actor)
                if status.locked_until is not None:
                    return _locked(status.locked_until.isoformat())
                return json_error(400, "invalid_code", "That code didn't work. Try again.")
            await self.service.succeeded(method, caller.actor)
            left = await self.service.store.recovery_codes_left(caller.identity.user_id)
        except StoreUnavailable:
            return json_error(503, "store_unavailable", "Security checks are unavailable.")
        return await self._verified_answer(
            request, caller, {"verified": True, "recovery_codes_left": left}
        )

    async def verify_totp(self, request: web.Request) -> web.Response:
        async def check(caller: Caller, code: str) -> bool:
            return await self.service.verify_totp(caller.identity.user_id, code)

        return await self._verify(request, "totp", check)

    async def verify_recovery(self, request: web.Request) -> web.Response:
        async def check(caller: Caller, code: str) -> bool:
            return await self.service.use_recovery_code(caller.identity.user_id, code, caller.actor)

        return await self._verify(request, "recovery_code", check)

    async def regenerate_recovery_codes(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        if not caller.state.enrolled:
            return json_error(409, "not_enrolled", "Set up a sign-in method first.")
        if not self.stepped_up(caller):
            return self.step_up_required(f"{self.prefix}/security")
        codes = await self.service.new_recovery_codes(
            caller.identity.user_id, caller.actor, first=False
        )
        return web.json_response({"recovery_codes": codes}, headers=_NO_STORE)

    async def remove_totp(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        if not caller.state.totp:
            return json_error(404, "not_found", "No authenticator app is set up.")
        if not self.stepped_up(caller):
            return self.step_up_required(f"{self.prefix}/security")
        if caller.state.passkeys == 0 and self.required(caller.identity):
            return json_error(
                409,
                "last_method",
                "Your organization requires MFA: add another method before removing this one.",
            )
        await self.service.remove_totp(caller.identity.user_id, caller.actor)
        return await self._verified_answer(request, caller, {"removed": True})

    # --- passkeys -------------------------------------------------------------------------

    async def passkey_begin(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        if caller.state.enrolled and not self.stepped_up(caller):
            return self.step_up_required(f"{self.prefix}/setup")
        name = caller.identity.email or caller.identity.user_id
        begun = await self.passkeys.begin_registration(
            user_id=caller.identity.user_id,
            user_name=name,
            display_name=name,
            session_id=session_id(caller.session),
            now=self.service.now(),
        )
        return self._ceremony(caller, REGISTER, begun)

    async def passkey_finish(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        data = await self.body(request)
        if isinstance(data, web.Response):
            return data
        name = data.get("name")
        first = not caller.state.enrolled
        if not first and not self.stepped_up(caller):
            # Checked again here: the account may have been enrolled elsewhere since begin.
            return self.step_up_required(f"{self.prefix}/setup")
        try:
            record = await self.passkeys.finish_registration(
                user_id=caller.identity.user_id,
                session_id=session_id(caller.session),
                challenge_id=pop_challenge(caller.session, REGISTER),
                credential=data.get("credential"),
                name=name if isinstance(name, str) else "Passkey",
                now=self.service.now(),
            )
        except PasskeyError as exc:
            return json_error(400, "passkey_failed", str(exc))
        await self.service.enrolled(
            caller.identity.user_id,
            caller.actor,
            "passkey",
            name=record.name,
            aaguid=record.aaguid,
        )
        return await self._enrolled(request, caller, first=first)

    async def verify_passkey_begin(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        lockout = await self.service.lockout(caller.identity.user_id, caller.actor.client_ip)
        if lockout.locked_until is not None:
            return _locked(lockout.locked_until.isoformat())
        try:
            begun = await self.passkeys.begin_authentication(
                user_id=caller.identity.user_id,
                session_id=session_id(caller.session),
                now=self.service.now(),
            )
        except PasskeyError as exc:
            return json_error(409, "no_passkeys", str(exc))
        return self._ceremony(caller, AUTHENTICATE, begun)

    async def verify_passkey_finish(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        data = await self.body(request)
        if isinstance(data, web.Response):
            return data
        lockout = await self.service.lockout(caller.identity.user_id, caller.actor.client_ip)
        if lockout.locked_until is not None:
            self.service.metrics.verifications_total.labels("passkey", "locked").inc()
            return _locked(lockout.locked_until.isoformat())
        try:
            await self.passkeys.finish_authentication(
                user_id=caller.identity.user_id,
                session_id=session_id(caller.session),
                challenge_id=pop_challenge(caller.session, AUTHENTICATE),
                credential=data.get("credential"),
                now=self.service.now(),
            )
        except PasskeyError as exc:
            status = await self.service.failed("passkey", caller.actor)
            if status.locked_until is not None:
                return _locked(status.locked_until.isoformat())
            # The challenge was consumed: the session must be saved without it.
            response = json_error(400, "passkey_failed", str(exc))
            return response
        await self.service.succeeded("passkey", caller.actor)
        self.service.forget(caller.identity.user_id)
        return await self._verified_answer(request, caller, {"verified": True})

    async def remove_passkey(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if isinstance(caller, web.Response):
            return caller
        shown = request.match_info["id"]
        # Never log a full credential id (the access log writes the path).
        request[LOG_PATH] = f"{self.prefix}/api/passkeys/{shown[:6]}..."
        credential_id = credential_id_from(shown)
        mine = [
            p
            for p in await self.service.store.passkeys(caller.identity.user_id)
            if p.credential_id == credential_id
        ]
        if not mine:
            return json_error(404, "not_found", "No such passkey on your account.")
        if not self.stepped_up(caller):
            return self.step_up_required(f"{self.prefix}/security")
        last = caller.state.passkeys == 1 and not caller.state.totp
        if last and self.required(caller.identity):
            return json_error(
                409,
                "last_method",
                "Your organization requires MFA: add another method before removing this one.",
            )
        if last and request.query.get("confirm") != "true":
            return json_error(
                409,
                "confirm_required",
                "This is your last sign-in method; removing it turns MFA off for you.",
            )
        await self.service.store.delete_passkey(caller.identity.user_id, mine[0].credential_id)
        await self.service.methods_removed(caller.identity.user_id, caller.actor, "passkey")
        return await self._verified_answer(request, caller, {"removed": True})

    # --- pages -----------------------------------------------------------------------------

    async def page(
        self, request: web.Request, render: Callable[[Caller], Awaitable[str]]
    ) -> web.Response:
        identity = request.get(IDENTITY)
        if identity is None:
            return web.Response(
                status=401,
                text=pages.render_signin_required(self.prefix, self.config.mfa.rp_name),
                content_type="text/html",
                headers=_NO_STORE,
            )
        caller = await self.caller(request)
        if isinstance(caller, web.Response):
            return caller
        return web.Response(text=await render(caller), content_type="text/html", headers=_NO_STORE)

    async def setup_page(self, request: web.Request) -> web.Response:
        async def render(caller: Caller) -> str:
            deadline = await self.grace_deadline(caller)
            from datetime import datetime

            return pages.render_setup(
                self.context(request, caller),
                required=self.required(caller.identity),
                grace_deadline=datetime.fromisoformat(deadline) if deadline else None,
                enrolled=caller.state.enrolled,
                has_totp=caller.state.totp,
            )

        return await self.page(request, render)

    async def verify_page(self, request: web.Request) -> web.Response:
        async def render(caller: Caller) -> str:
            lockout = await self.service.lockout(caller.identity.user_id, caller.actor.client_ip)
            return pages.render_verify(
                self.context(request, caller),
                has_totp=caller.state.totp,
                has_passkeys=caller.state.passkeys > 0,
                locked_until=lockout.locked_until,
            )

        if (identity := request.get(IDENTITY)) is not None:
            try:
                state = await self.service.state(identity.user_id)
            except StoreUnavailable:
                return json_error(503, "store_unavailable", "Security checks are unavailable.")
            if not state.enrolled:
                raise web.HTTPSeeOther(
                    f"{self.prefix}/setup?next={safe_next(request.query.get('next'), self.prefix)}"
                )
        return await self.page(request, render)

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = pages.static_file(name)
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(
            body=body,
            headers={
                "Content-Type": pages.STATIC_FILES[name],
                "Cache-Control": "public, max-age=300",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def not_found(self, request: web.Request) -> web.Response:
        return json_error(404, "not_found", "No such sidecar page.")


def _locked(until: str) -> web.Response:
    return json_error(
        429,
        "locked_out",
        "Too many failed attempts. Try again later.",
        locked_until=until,
    )


def add_routes(app: web.Application, handlers: Handlers) -> None:
    """Register the sidecar's own pages and personal JSON API under the prefix."""
    p = handlers.prefix
    r = app.router
    r.add_get(f"{p}/setup", handlers.setup_page)
    r.add_get(f"{p}/verify", handlers.verify_page)
    r.add_get(f"{p}/static/{{name}}", handlers.static)
    r.add_get(f"{p}/api/status", handlers.status)
    r.add_post(f"{p}/api/totp/begin", handlers.totp_begin)
    r.add_post(f"{p}/api/totp/finish", handlers.totp_finish)
    r.add_delete(f"{p}/api/totp", handlers.remove_totp)
    r.add_post(f"{p}/api/passkey/begin", handlers.passkey_begin)
    r.add_post(f"{p}/api/passkey/finish", handlers.passkey_finish)
    r.add_delete(f"{p}/api/passkeys/{{id}}", handlers.remove_passkey)
    r.add_post(f"{p}/api/verify/passkey/begin", handlers.verify_passkey_begin)
    r.add_post(f"{p}/api/verify/passkey/finish", handlers.verify_passkey_finish)
    r.add_post(f"{p}/api/verify/totp", handlers.verify_totp)
    r.add_post(f"{p}/api/verify/recovery", handlers.verify_recovery)
    r.add_post(f"{p}/api/recovery-codes/regenerate", handlers.regenerate_recovery_codes)


def add_prefix_fallback(app: web.Application, handlers: Handlers) -> None:
    """404 for anything else under the prefix, registered after every sidecar route and
    before the proxy's catch-all: nothing below the prefix is ever forwarded."""
    p = handlers.prefix
    app.router.add_route("*", p, handlers.not_found)
    app.router.add_route("*", f"{p}/{{tail:.*}}", handlers.not_found)
