"""Pipeline step 5: the organization's MFA policy, for authenticated users.

Who passes without a decision: the sidecar's own routes, ``mfa.exempt_paths`` (matched on the
canonical path, which is also what the console receives), anonymous requests (the console
answers those itself), and API clients: requests whose identity source recognised an API
token (``Identity.api_token``, see ``identity.jwt.api_token`` and
``identity.introspect.api_token``), and, only when ``mfa.enforce_on_tokens`` is false, every
request authenticated by ``Authorization: Bearer`` alone. A bearer token on its own is no
API client: a browser's session token can be sent that way, and exempting it would let a
phished password reach the console's API without a second factor.

Everyone else (:func:`mfa_gate_applies`) gets a verdict from :func:`mfa_verdict`, which
applies ``sidecar.mfa.policy.decide``. Both also judge relayed WebSockets again while they are
open (``sidecar.websocket_review``): one rule, one place. "Required" answers: an HTML
navigation gets 303 to the setup or verify page with ``next``; anything else 403 JSON
``{"error": ..., "location": ...}``. During grace an HTML navigation gets, once per session, an
interstitial with the deadline. When the store cannot answer, the request is refused with 503
(fail closed); the IP gate before this stage keeps working from memory.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import TypeGuard

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.answers import harden, is_html_navigation, json_error, unavailable
from sidecar.config import Config, Mfa
from sidecar.decision import Decision
from sidecar.identity.base import Identity, is_privileged
from sidecar.live import LiveSettings
from sidecar.mfa import pages
from sidecar.mfa.policy import MfaPolicy, MfaVerdict, decide, needs_grace_start
from sidecar.mfa.service import MfaService
from sidecar.mfa.session import SessionView, csrf_token, mark_grace_shown, session_for, view
from sidecar.paths import is_exempt, is_under, with_next
from sidecar.refused_summary import RefusedSummary
from sidecar.settings import SettingsService
from sidecar.state import DECISION, IDENTITY, MFA_SESSION, REASON
from sidecar.store.base import MfaState, SecuritySettings, StoreUnavailable

log = logging.getLogger("sidecar.mfa")

#: Concurrent calls of one user to the sidecar's own routes (pages, API) in one process.
MAX_SIDECAR_CALLS_PER_USER = 8

_SETUP_ERROR = "mfa_setup_required"
_VERIFY_ERROR = "mfa_verification_required"


def binding_of(credential_hash: bytes) -> str:
    """What the sidecar session stores to bind itself to the console credential."""
    return credential_hash[:16].hex()


def mfa_gate_applies(identity: Identity | None, raw_path: str, mfa: Mfa) -> TypeGuard[Identity]:
    """Whether the MFA gate judges a caller: authenticated (anonymous callers are the
    console's to answer), not on an exempt path, and not an API client: a recognised API
    token, or (only when ``mfa.enforce_on_tokens`` is false) any bearer-only request.
    ``raw_path`` is the path as the console receives it: ``request.path`` has ``%2F``
    decoded, and ``/static/..%2Fsettings`` must not count as static."""
    if identity is None or is_exempt(raw_path, mfa.exempt_paths):
        return False
    return not (identity.api_token or (identity.bearer_only and not mfa.enforce_on_tokens))


async def mfa_verdict(
    identity: Identity,
    session: SessionView,
    *,
    current: SecuritySettings,
    state: MfaState,
    config: Config,
    service: MfaService,
) -> MfaVerdict:
    """The MFA gate's verdict for one caller it judges (:func:`mfa_gate_applies`), from
    their identity, their sidecar session, the live security settings and their MFA state.

    May start the user's grace clock (the first time the requirement is seen for them);
    raises StoreUnavailable when that cannot be looked up.
    """
    privileged = is_privileged(identity, config.identity.admin_roles)
    policy = MfaPolicy(current.mfa_policy)
    grace_started = None
    if needs_grace_start(policy=policy, privileged=privileged, enrolled=state.enrolled):
        grace_started = await service.grace_started(
            identity.user_id, settings_version=current.version
        )
    return decide(
        policy=policy,
        privileged=privileged,
        enrolled=state.enrolled,
        verified=session.verified_for(
            user=identity.user_id,
            binding=binding_of(identity.credential_hash),
            generation=state.mfa_generation,
            now=time.time(),
            verify_every=config.mfa.verify_every,
        ),
        grace_started=grace_started,
        grace_period=timedelta(seconds=current.grace_period_seconds),
        now=service.now(),
    )


def mfa_gate_middleware(
    *,
    live: LiveSettings,
    settings: SettingsService,
    service: MfaService,
    refused: RefusedSummary,
) -> Middleware:
    # The prefix is where the routes were registered: it changes only with a restart.
    prefix = live.config.mfa.path_prefix
    # Sidecar calls in progress per user (this process): bounded, see MAX_SIDECAR_CALLS_PER_USER.
    busy: dict[str, int] = {}

    @web.middleware
    async def mfa_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        config = live.config
        mfa = config.mfa
        path = request.path
        if is_under(path, prefix):
            request[DECISION] = Decision.SIDECAR
            identity = request.get(IDENTITY)
            user = identity.user_id if identity is not None else None
            if user is not None and busy.get(user, 0) >= MAX_SIDECAR_CALLS_PER_USER:
                # One user's burst (300 concurrent guesses, say) must not take the store's
                # connection pool from everyone else: refused before any store work.
                request[REASON] = "too many concurrent sidecar calls for one user"
                answer = json_error(
                    429, "too_many_requests", "Too many requests at once. Try again in a moment."
                )
                answer.headers["Retry-After"] = "1"
                return answer
            if user is not None:
                busy[user] = busy.get(user, 0) + 1
            try:
                return harden(await handler(request))
            except web.HTTPException as refusal:
                harden(refusal)
                raise
            except StoreUnavailable as exc:
                # Any sidecar page or API call that needed the store: 503, never a 500.
                return harden(_store_down(refused, request, str(exc)))
            finally:
                if user is not None:
                    busy[user] -= 1
                    if not busy[user]:
                        del busy[user]
        identity = request.get(IDENTITY)
        if not mfa_gate_applies(identity, request.rel_url.raw_path, mfa):
            return await handler(request)
        current = settings.current
        if current is None:
            return _store_down(refused, request, "security settings not loaded yet")
        try:
            state = await service.state(identity.user_id)
            session = await session_for(
                request, user=identity.user_id, binding=binding_of(identity.credential_hash)
            )
            session_view = view(session)
            verdict = await mfa_verdict(
                identity,
                session_view,
                current=current,
                state=state,
                config=config,
                service=service,
            )
            await service.touch(identity.user_id, email=identity.email, role=identity.role)
        except StoreUnavailable as exc:
            return _store_down(refused, request, str(exc))
        request[MFA_SESSION] = session_view
        request[DECISION] = verdict.decision
        if verdict.decision is Decision.ALLOWED:
            return await handler(request)
        navigation = is_html_navigation(request)
        if verdict.decision is Decision.GRACE:
            if navigation and not session_view.grace_shown and verdict.grace_deadline:
                mark_grace_shown(session)
                interstitial = web.Response(
                    text=pages.render_grace_interstitial(
                        pages.PageContext(
                            prefix=prefix,
                            csrf_token=csrf_token(session),
                            user=identity.email or identity.user_id,
                            role=identity.role,
                            next_path=request.rel_url.raw_path_qs,
                            app_name=mfa.rp_name,
                        ),
                        deadline=verdict.grace_deadline,
                        continue_url=request.rel_url.raw_path_qs,
                    ),
                    content_type="text/html",
                    headers={"Cache-Control": "no-store"},
                )
                return harden(interstitial)
            return await handler(request)
        page, error = (
            ("setup", _SETUP_ERROR)
            if verdict.decision is Decision.MFA_SETUP_REQUIRED
            else ("verify", _VERIFY_ERROR)
        )
        location = f"{prefix}/{page}"
        if navigation:
            target = with_next(location, request.rel_url.raw_path_qs)
            return web.Response(
                status=303, headers={"Location": target, "Cache-Control": "no-store"}
            )
        return json_error(
            403,
            error,
            "Set up multi-factor authentication to continue."
            if page == "setup"
            else "Verify with your second factor to continue.",
            location=location,
        )

    return mfa_gate


def _store_down(refused: RefusedSummary, request: web.Request, reason: str) -> web.Response:
    request[DECISION] = Decision.STORE_UNAVAILABLE
    request[REASON] = reason
    refused.note("store unavailable", reason)
    return unavailable(request, "store_unavailable", "Security checks are unavailable right now.")
