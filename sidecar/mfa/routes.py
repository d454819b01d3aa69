"""The sidecar's own routes under ``mfa.path_prefix``: setup and verify pages, their JSON API.

Every route needs a console identity (401 otherwise). Every state-changing call needs the
session's CSRF token in ``X-CSRF-Token`` and must not come from another site (``Origin`` in
``mfa.origin``, ``Sec-Fetch-Site`` same-origin when the browser sends them). Answers are
``Cache-Control: no-store``: some carry recovery codes or secrets. Refusals are raised
(:class:`sidecar.answers.Refusal`).

Rules every begin/finish pair keeps (the finish re-checks what the begin checked, on state
read from the store then, because the account may have changed in between):

- Adding a method to an enrolled account needs a verification in the last 10 minutes
  (step-up), and the write is conditional on the generation that verification was made under:
  a reset or removal on any replica in between makes it fail. A first enrollment is
  conditional on the account still having no method.
- A pending authenticator-app secret is bound to the session that began it, expires after
  ``PENDING_TOTP_SECONDS`` and is discarded when any method is added, removed or reset.
- Every secret checked (a code at verification or at enrollment, a recovery code, a passkey
  assertion) is a counted attempt (``MfaService.attempt``); attempts against a method the
  account does not have are refused with 409 ``not_enrolled`` and not counted.
- A session is marked verified under the generation returned by the write or the
  consumption that succeeded, never under one read afterwards.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

from aiohttp import web
from aiohttp_session import Session
from webauthn.helpers import bytes_to_base64url

from sidecar.answers import Refusal, json_error
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
from sidecar.mfa.service import Actor, Attempt, MfaService
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
from sidecar.paths import canonical_path, is_local_path, is_under, with_next
from sidecar.settings import SettingsService
from sidecar.state import CLIENT_IP, IDENTITY, LOG_PATH
from sidecar.store.base import MfaState, PasskeyRecord, StoreUnavailable

log = logging.getLogger("sidecar.mfa")


class Guard(StrEnum):
    """What a route promises to check before doing anything (a test enumerates the router
    and tries to get past each one)."""

    SIGNED_IN = "signed_in"  # a console identity, else 401
    SAME_SITE = "same_site"  # the session's CSRF token, same site; else 403 csrf
    ADMIN = "admin"  # a role in identity.admin_roles, else 403 forbidden
    STEP_UP = "step_up"  # verified in the last 10 minutes (of an enrolled account), else 403
    COUNTED = "counted"  # checks a secret as a counted attempt: 429 while locked out


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # below the prefix
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    guards: frozenset[Guard]


#: Every route the app registers, with its declared guards ((method, path) -> guards);
#: routes without guards (static assets, 404s, the proxy) are declared with none.
ROUTE_GUARDS = web.AppKey("sidecar.route_guards", dict[tuple[str, str], frozenset[Guard]])


def register(app: web.Application, prefix: str, routes: list[Route]) -> None:
    """Add ``routes`` under ``prefix`` and record their declared guards."""
    declared = app.setdefault(ROUTE_GUARDS, {})
    for route in routes:
        path = prefix + route.path
        # GET answers HEAD too (as aiohttp's add_get does), under the same guards.
        for method in ("HEAD", "GET") if route.method == "GET" else (route.method,):
            added = app.router.add_route(method, path, route.handler)
            declared[(method, added.resource.canonical if added.resource else path)] = route.guards


#: How recent a verification must be for sensitive changes (step-up).
STEP_UP_SECONDS = 600.0
#: Longest code accepted in a JSON body (a recovery code with spaces is ~15 characters).
MAX_CODE_LENGTH = 64

_NO_STORE = {"Cache-Control": "no-store"}


def safe_next(value: str | None, prefix: str) -> str:
    """A same-origin relative path to go to after setup or verification, else ``/``.

    Local means what ``paths.is_local_path`` says (the one rule for redirect targets); on top
    of it, the sidecar's own pages are refused (no loops), except the pages that send a user
    to verify for a step-up.
    """
    if value is None or not is_local_path(value):
        return "/"
    # Judged as the router will see it: "/%6Dfa/setup" is the setup page too.
    path = canonical_path(unquote(urlsplit(value).path))
    if path in (f"{prefix}/security", f"{prefix}/audit"):
        return value  # back to the page that sent the user to verify (step-up)
    if is_under(path, prefix):
        return "/"
    return value


@dataclass(slots=True)
class Caller:
    identity: Identity
    session: Session
    binding: str
    actor: Actor
    state: MfaState  # read from the store for this request (never the gate's cache)


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


def store_unavailable(message: str = "Security checks are unavailable.") -> Refusal:
    return Refusal(503, "store_unavailable", message, headers={"Retry-After": "5"})


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

    # --- guards ----------------------------------------------------------------------------

    async def caller(self, request: web.Request) -> Caller:
        """The signed-in caller with their MFA state read now; 401 or 503 otherwise."""
        identity = request.get(IDENTITY)
        if identity is None:
            raise Refusal(401, "unauthenticated", "Sign in to the console first.")
        binding = binding_of(identity.credential_hash)
        session = await session_for(request, user=identity.user_id, binding=binding)
        client_ip = request.get(CLIENT_IP)
        try:
            state = await self.service.fresh_state(identity.user_id)
            await self.service.touch(identity.user_id, email=identity.email, role=identity.role)
        except StoreUnavailable:
            raise store_unavailable() from None
        return Caller(
            identity,
            session,
            binding,
            Actor(identity.user_id, str(client_ip) if client_ip else None),
            state,
        )

    async def writer(self, request: web.Request) -> Caller:
        """The caller of a state-changing call (401, CSRF refusals raised)."""
        caller = await self.caller(request)
        self.check_same_site(request, caller.session)
        return caller

    def check_same_site(self, request: web.Request, session: Session) -> None:
        """Refuse (403 ``csrf``) a state-changing call from another site or without the
        session's CSRF token."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in self._origins:
            raise Refusal(403, "csrf", "Request from another site refused.")
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise Refusal(403, "csrf", "Request from another site refused.")
        token = request.headers.get("X-CSRF-Token", "")
        if not token or not hmac.compare_digest(token.encode(), csrf_token(session).encode()):
            raise Refusal(403, "csrf", "Missing or wrong CSRF token; reload the page.")

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

    def step_up_required(self, next_path: str = "/") -> Refusal:
        return Refusal(
            403,
            "step_up_required",
            "Confirm it's you again before changing your security settings.",
            location=with_next(f"{self.prefix}/verify", next_path),
        )

    def require_step_up(self, caller: Caller, next_path: str) -> int:
        """Refuse unless the session verified recently under the current generation; the
        generation to make the change conditional on."""
        if not self.stepped_up(caller):
            raise self.step_up_required(next_path)
        return caller.state.mfa_generation

    async def enrollment_condition(self, caller: Caller) -> int | None:
        """What adding a method is conditional on: ``None`` (the account still has no method)
        for a first enrollment, else a step-up under the current generation.

        A first enrollment from a console session that a reset revoked (it had verified
        before the reset: perhaps the very session the reset was meant to evict) is refused:
        sign in to the console again first. The store checks the same in the write."""
        if caller.state.enrolled:
            return self.require_step_up(caller, f"{self.prefix}/setup")
        if await self.service.store.mfa.binding_revoked(caller.identity.user_id, caller.binding):
            await self.service.audit.record(
                "mfa.enrolled",
                actor=caller.actor.user,
                client_ip=caller.actor.client_ip,
                outcome="refused",
                reason="session_reset",
            )
            raise Refusal(
                403,
                "sign_in_again",
                f"Your sign-in methods were reset. Sign out of {self.config.mfa.rp_name}, "
                "sign in again, then set up MFA.",
            )
        return None

    async def body(self, request: web.Request) -> dict[str, Any]:
        if not request.body_exists:
            return {}
        if request.content_type not in ("application/json", "application/octet-stream", ""):
            # A form post or anything else: the API speaks JSON only (codes never arrive in
            # form or query encoding).
            raise Refusal(415, "unsupported_media_type", "Send the request body as JSON.")
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
            # RecursionError: "[[[[..." nested deeper than the JSON parser can follow.
            raise Refusal(400, "bad_request", "The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise Refusal(400, "bad_request", "The request body must be a JSON object.")
        return data

    async def code_from(self, request: web.Request, message: str) -> str:
        """The ``code`` of a JSON body: a non-empty string of sane length."""
        code = (await self.body(request)).get("code")
        if not isinstance(code, str) or not code.strip() or len(code) > MAX_CODE_LENGTH:
            raise Refusal(400, "bad_request", message)
        return code

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
        start = await self.service.grace_started(
            caller.identity.user_id, settings_version=current.version
        )
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

    # --- answers ---------------------------------------------------------------------------

    async def verified_answer(
        self, request: web.Request, caller: Caller, generation: int, payload: dict[str, Any]
    ) -> web.Response:
        """Answer a successful enrollment or verification on a brand-new session, verified
        under ``generation`` (the one the successful write or consumption returned)."""
        session = await mark_verified(
            request, user=caller.identity.user_id, binding=caller.binding, generation=generation
        )
        # Remembered so that a reset can revoke this console session (see
        # enrollment_condition).
        await self.service.store.mfa.record_binding(
            caller.identity.user_id, caller.binding, self.service.now()
        )
        payload["csrf_token"] = csrf_token(session)
        return web.json_response(payload, headers=_NO_STORE)

    async def enrolled_answer(
        self, request: web.Request, caller: Caller, generation: int
    ) -> web.Response:
        """After a method was added: recovery codes on the first enrollment only (shown
        once), and a new session verified under the enrollment's generation."""
        codes = None
        if not caller.state.enrolled:
            codes = await self.service.new_recovery_codes(
                caller.identity.user_id, caller.actor, first=True, expected_generation=generation
            )
        return await self.verified_answer(
            request, caller, generation, {"recovery_codes": codes, "verified": True}
        )

    def changed_meanwhile(self) -> Refusal:
        return Refusal(
            409,
            "changed_meanwhile",
            "Your security settings changed while you were doing this. Reload and try again.",
        )

    def refuse_attempt(self, attempt: Attempt, wrong: str) -> NoReturn:
        """The answer to a counted attempt that did not succeed."""
        if attempt.locked_until is not None:
            locked(attempt.locked_until, attempt.locked_by)
        raise Refusal(400, "invalid_code", wrong, attempts_left=attempt.attempts_left)

    def ceremony(self, caller: Caller, purpose: str, begun: Begun) -> web.Response:
        """Remember the challenge in the session and answer the options JSON."""
        remember_challenge(caller.session, purpose, begun.challenge_id)
        return web.Response(
            text=begun.options_json, content_type="application/json", headers=_NO_STORE
        )

    # --- JSON API --------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        caller = await self.caller(request)
        try:
            passkeys = await self.service.store.mfa.passkeys(caller.identity.user_id)
            deadline = await self.grace_deadline(caller)
        except StoreUnavailable:
            raise store_unavailable() from None
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
        await self.enrollment_condition(caller)
        if caller.state.totp:
            raise Refusal(
                409, "already_enrolled", "An authenticator app is already set up; remove it first."
            )
        account = caller.identity.email or caller.identity.user_id
        secret, uri, svg = await self.service.begin_totp(
            caller.identity.user_id, account, session_id=session_id(caller.session)
        )
        return web.json_response(
            {"secret": secret, "otpauth_uri": uri, "qr_svg": svg}, headers=_NO_STORE
        )

    async def totp_finish(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        code = await self.code_from(request, "Enter the 6-digit code from your app.")
        # The same rules as at begin, on the state as it is now.
        condition = await self.enrollment_condition(caller)
        if caller.state.totp:
            raise Refusal(
                409, "already_enrolled", "An authenticator app is already set up; remove it first."
            )
        user, sid = caller.identity.user_id, session_id(caller.session)
        pending = await self.service.pending_totp(user, session_id=sid)
        if pending is None:
            raise Refusal(
                409,
                "enrollment_expired",
                "This setup expired or was replaced. Start again to get a new QR code.",
            )

        async def check() -> int | None:
            step = self.service.totp_step(pending.secret, code)
            if step is None:
                return None  # a wrong code: counted
            generation = await self.service.store.mfa.confirm_totp(
                user,
                secret=pending.secret,
                step=step,
                session_id=sid,
                issued_after=self.service.pending_cutoff(),
                expected_generation=condition,
                now=self.service.now(),
                binding=caller.binding,
            )
            if generation is None:
                # A right code, but the account changed (enrolled, reset) since the checks
                # above: nothing was written.
                raise self.changed_meanwhile()
            return generation

        attempt = await self.service.attempt("totp", caller.actor, check, action="mfa.enrolled")
        if attempt.generation is None:
            self.refuse_attempt(attempt, "That code didn't match. Check your app and try again.")
        await self.service.enrolled(user, caller.actor, "totp")
        return await self.enrolled_answer(request, caller, attempt.generation)

    async def verify(
        self,
        request: web.Request,
        method: str,
        has_method: Callable[[MfaState], bool],
        check: Callable[[Caller, str], Awaitable[int | None]],
    ) -> web.Response:
        caller = await self.writer(request)
        code = await self.code_from(request, "Enter a code.")
        if not has_method(caller.state):
            raise Refusal(409, "not_enrolled", "You have not set up this sign-in method.")
        try:
            attempt = await self.service.attempt(method, caller.actor, lambda: check(caller, code))
            if attempt.generation is None:
                self.refuse_attempt(attempt, "That code didn't work. Try again.")
            left = await self.service.store.mfa.recovery_codes_left(caller.identity.user_id)
        except StoreUnavailable:
            raise store_unavailable() from None
        return await self.verified_answer(
            request, caller, attempt.generation, {"verified": True, "recovery_codes_left": left}
        )

    async def verify_totp(self, request: web.Request) -> web.Response:
        async def check(caller: Caller, code: str) -> int | None:
            return await self.service.check_totp(caller.identity.user_id, code)

        return await self.verify(request, "totp", lambda state: state.totp, check)

    async def verify_recovery(self, request: web.Request) -> web.Response:
        async def check(caller: Caller, code: str) -> int | None:
            return await self.service.check_recovery_code(
                caller.identity.user_id, code, caller.actor
            )

        return await self.verify(
            request, "recovery_code", lambda state: state.recovery_codes_left > 0, check
        )

    async def regenerate_recovery_codes(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if not caller.state.enrolled:
            raise Refusal(409, "not_enrolled", "Set up a sign-in method first.")
        generation = self.require_step_up(caller, f"{self.prefix}/security")
        codes = await self.service.new_recovery_codes(
            caller.identity.user_id, caller.actor, first=False, expected_generation=generation
        )
        if codes is None:
            raise self.step_up_required(f"{self.prefix}/security")
        return web.json_response({"recovery_codes": codes}, headers=_NO_STORE)

    async def remove_totp(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        generation = self.require_step_up(caller, f"{self.prefix}/security")
        if not caller.state.totp:
            raise Refusal(404, "not_found", "No authenticator app is set up.")
        if caller.state.passkeys == 0 and self.required(caller.identity):
            raise Refusal(
                409,
                "last_method",
                "Your organization requires MFA: add another method before removing this one.",
            )
        new = await self.service.store.mfa.remove_totp(
            caller.identity.user_id, expected_generation=generation
        )
        if new is None:
            raise self.step_up_required(f"{self.prefix}/security")
        await self.service.methods_removed(caller.identity.user_id, caller.actor, "totp")
        return await self.verified_answer(request, caller, new, {"removed": True})

    # --- passkeys -------------------------------------------------------------------------

    async def passkey_begin(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        await self.enrollment_condition(caller)
        name = caller.identity.email or caller.identity.user_id
        begun = await self.passkeys.begin_registration(
            user_id=caller.identity.user_id,
            user_name=name,
            display_name=name,
            session_id=session_id(caller.session),
            now=self.service.now(),
        )
        return self.ceremony(caller, REGISTER, begun)

    async def passkey_finish(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        data = await self.body(request)
        name = data.get("name")
        # Checked again here: the account may have been enrolled or reset since begin.
        condition = await self.enrollment_condition(caller)
        try:
            record = await self.passkeys.finish_registration(
                user_id=caller.identity.user_id,
                session_id=session_id(caller.session),
                challenge_id=pop_challenge(caller.session, REGISTER),
                credential=data.get("credential"),
                name=name if isinstance(name, str) else "Passkey",
                now=self.service.now(),
            )
            generation = await self.service.store.mfa.add_passkey(
                record, expected_generation=condition, binding=caller.binding
            )
        except ValueError:  # registered concurrently by another request
            raise Refusal(400, "passkey_failed", "This passkey is already registered.") from None
        except PasskeyError as exc:
            raise Refusal(400, "passkey_failed", str(exc)) from None
        if generation is None:
            raise self.changed_meanwhile()
        await self.service.enrolled(
            caller.identity.user_id,
            caller.actor,
            "passkey",
            name=record.name,
            aaguid=record.aaguid,
        )
        return await self.enrolled_answer(request, caller, generation)

    async def verify_passkey_begin(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        if caller.state.passkeys == 0:
            raise Refusal(409, "not_enrolled", "You have no passkeys yet.")
        until, by = await self.service.lockout_status(caller.actor)
        if until is not None:
            locked(until, by)
        try:
            begun = await self.passkeys.begin_authentication(
                user_id=caller.identity.user_id,
                session_id=session_id(caller.session),
                now=self.service.now(),
            )
        except PasskeyError as exc:
            raise Refusal(409, "not_enrolled", str(exc)) from None
        return self.ceremony(caller, AUTHENTICATE, begun)

    async def verify_passkey_finish(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        data = await self.body(request)
        if caller.state.passkeys == 0:
            raise Refusal(409, "not_enrolled", "You have no passkeys yet.")
        challenge_id = pop_challenge(caller.session, AUTHENTICATE)
        failure: list[str] = []

        async def check() -> int | None:
            try:
                return await self.passkeys.finish_authentication(
                    user_id=caller.identity.user_id,
                    session_id=session_id(caller.session),
                    challenge_id=challenge_id,
                    credential=data.get("credential"),
                    now=self.service.now(),
                )
            except PasskeyError as exc:
                failure.append(str(exc))
                return None

        attempt = await self.service.attempt("passkey", caller.actor, check)
        if attempt.generation is None:
            if attempt.locked_until is not None:
                locked(attempt.locked_until, attempt.locked_by)
            # The challenge was consumed: the session is saved without it.
            raise Refusal(
                400,
                "passkey_failed",
                failure[0] if failure else "The passkey could not be verified.",
                attempts_left=attempt.attempts_left,
            )
        return await self.verified_answer(request, caller, attempt.generation, {"verified": True})

    async def remove_passkey(self, request: web.Request) -> web.Response:
        caller = await self.writer(request)
        generation = self.require_step_up(caller, f"{self.prefix}/security")
        shown = request.match_info["id"]
        # Never log a full credential id (the access log writes the path).
        request[LOG_PATH] = f"{self.prefix}/api/passkeys/{shown[:6]}..."
        credential_id = credential_id_from(shown)
        mine = [
            p
            for p in await self.service.store.mfa.passkeys(caller.identity.user_id)
            if p.credential_id == credential_id
        ]
        if not mine:
            raise Refusal(404, "not_found", "No such passkey on your account.")
        last = caller.state.passkeys == 1 and not caller.state.totp
        if last and self.required(caller.identity):
            raise Refusal(
                409,
                "last_method",
                "Your organization requires MFA: add another method before removing this one.",
            )
        if last and request.query.get("confirm") != "true":
            raise Refusal(
                409,
                "confirm_required",
                "This is your last sign-in method; removing it turns MFA off for you.",
            )
        new = await self.service.store.mfa.remove_passkey(
            caller.identity.user_id, mine[0].credential_id, expected_generation=generation
        )
        if new is None:
            raise self.step_up_required(f"{self.prefix}/security")
        await self.service.methods_removed(caller.identity.user_id, caller.actor, "passkey")
        return await self.verified_answer(request, caller, new, {"removed": True})

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
        return web.Response(text=await render(caller), content_type="text/html", headers=_NO_STORE)

    async def setup_page(self, request: web.Request) -> web.Response:
        async def render(caller: Caller) -> str:
            deadline = await self.grace_deadline(caller)
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
            if not caller.state.enrolled:
                raise web.HTTPSeeOther(
                    with_next(
                        f"{self.prefix}/setup", safe_next(request.query.get("next"), self.prefix)
                    )
                )
            until, _ = await self.service.lockout_status(caller.actor)
            return pages.render_verify(
                self.context(request, caller),
                has_totp=caller.state.totp,
                has_passkeys=caller.state.passkeys > 0,
                locked_until=until,
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


def locked(until: datetime, by: str | None) -> NoReturn:
    """429 while the user (or the client address, ``by="address"``) is locked out."""
    retry = max(1, int((until - datetime.now(until.tzinfo)).total_seconds()) + 1)
    message = (
        "Too many failed attempts from your network address. Try again later."
        if by == "address"
        else "Too many failed attempts. Try again later."
    )
    raise Refusal(
        429,
        "locked_out",
        message,
        headers={"Retry-After": str(retry)},
        locked_until=until.isoformat(),
        locked_by=by or "user",
    )


_USER = frozenset({Guard.SIGNED_IN})
_WRITE = frozenset({Guard.SIGNED_IN, Guard.SAME_SITE})
_CHANGE = _WRITE | {Guard.STEP_UP}
_VERIFY = _WRITE | {Guard.COUNTED}


def add_routes(app: web.Application, handlers: Handlers) -> None:
    """Register the sidecar's own pages and personal JSON API under the prefix."""
    h = handlers
    register(
        app,
        h.prefix,
        [
            Route("GET", "/setup", h.setup_page, _USER),
            Route("GET", "/verify", h.verify_page, _USER),
            Route("GET", "/static/{name}", h.static, frozenset()),
            Route("GET", "/api/status", h.status, _USER),
            # Adding a method: step-up when the account is enrolled already.
            Route("POST", "/api/totp/begin", h.totp_begin, _CHANGE),
            Route("POST", "/api/totp/finish", h.totp_finish, _CHANGE | {Guard.COUNTED}),
            Route("DELETE", "/api/totp", h.remove_totp, _CHANGE),
            Route("POST", "/api/passkey/begin", h.passkey_begin, _CHANGE),
            Route("POST", "/api/passkey/finish", h.passkey_finish, _CHANGE),
            Route("DELETE", "/api/passkeys/{id}", h.remove_passkey, _CHANGE),
            Route("POST", "/api/verify/passkey/begin", h.verify_passkey_begin, _VERIFY),
            Route("POST", "/api/verify/passkey/finish", h.verify_passkey_finish, _VERIFY),
            Route("POST", "/api/verify/totp", h.verify_totp, _VERIFY),
            Route("POST", "/api/verify/recovery", h.verify_recovery, _VERIFY),
            Route("POST", "/api/recovery-codes/regenerate", h.regenerate_recovery_codes, _CHANGE),
        ],
    )


def add_prefix_fallback(app: web.Application, handlers: Handlers) -> None:
    """404 for anything else under the prefix, registered after every sidecar route and
    before the proxy's catch-all: nothing below the prefix is ever forwarded."""
    register(
        app,
        handlers.prefix,
        [
            Route("*", "", handlers.not_found, frozenset()),
            Route("*", "/{tail:.*}", handlers.not_found, frozenset()),
        ],
    )
