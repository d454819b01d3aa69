"""Relayed WebSockets are judged again while they are open, not only at the upgrade.

The pipeline judges a request once; a WebSocket is one request that can last for days. An
address denylisted during an incident, an MFA reset after a stolen session, a verification
past ``mfa.verify_every``, a policy that now requires setup: each refuses the next request
at once, and must end the WebSockets already open too, or a live terminal outlives them.

Promises:

- Every relayed WebSocket is judged again every :data:`REVIEW_EVERY_SECONDS`, and at once
  when the live settings change (IP lists, MFA policy: :meth:`WebSocketReview.wake`), on what
  it was admitted on (:class:`sidecar.proxy.Admission`: the client address, the identity, the
  sidecar session as the MFA gate read it) against the *live* IP gate and MFA verdict: the
  same functions the pipeline uses (``IpGate.decide``, ``mfa_gate_applies`` and
  ``mfa_verdict``), never a copy of their rules.
- One that would now be refused is closed: the client gets 1008 (policy violation) with the
  decision as the reason (``denied_ip``, ``not_allowlisted``, ``mfa_setup_required``,
  ``mfa_verification_required``), the console 1001 (going away). A grace period still
  running lets it stay open, as it lets requests through.
- Fail closed: when a user's MFA state cannot be read (the store is down and the cache
  expired), their WebSockets are closed with 1013 (try again later) and reason
  ``store_unavailable``, as their requests would get 503.
- Cost: one review reads each distinct user's MFA state once, through the MFA service's
  cache (a store read at most every few seconds per user), whatever the number of their
  WebSockets; the IP gate and the verdict are in-memory.

What is not asked again: the identity (the console ends its own sessions' WebSockets on
logout) and the client address (the one resolved at the upgrade).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from aiohttp import web

from sidecar.decision import Decision
from sidecar.live import LiveSettings
from sidecar.logs import fields
from sidecar.mfa.service import MfaService
from sidecar.mfa.session import SessionView
from sidecar.middleware.mfa_gate import mfa_gate_applies, mfa_verdict
from sidecar.proxy import RelayedWebSocket
from sidecar.settings import SettingsService
from sidecar.store.base import MfaState, StoreUnavailable

log = logging.getLogger("sidecar.websocket_review")

#: How often every open WebSocket is judged again (besides at each settings change).
REVIEW_EVERY_SECONDS = 2.0
#: RFC 6455 §7.4.1: "policy violation"; 1013 "try again later" (IANA registry).
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
#: What the MFA gate lets pass (a grace period lets requests through too).
_PASSING = frozenset({Decision.ALLOWED, Decision.GRACE})
#: The session of a WebSocket the MFA gate did not judge at its upgrade: verified for no one.
_NO_SESSION = SessionView(
    user=None, binding=None, verified_at=None, generation=None, grace_shown=False
)


class WebSocketReview:
    """Judges the relayed WebSockets again; one per app, run in its cleanup context."""

    def __init__(
        self,
        *,
        live: LiveSettings,
        settings: SettingsService,
        service: MfaService,
        relays: Callable[[], Iterable[RelayedWebSocket]],
        every: float = REVIEW_EVERY_SECONDS,
    ) -> None:
        self._live = live
        self._settings = settings
        self._service = service
        self._relays = relays
        self.every = every
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """Review now (the live settings changed), not at the next period."""
        self._woken.set()

    async def review(self) -> int:
        """Judge every open WebSocket once; end those no longer allowed. Returns how many
        were ended."""
        relays = list(self._relays())
        if not relays:
            return 0
        config = self._live.config
        gate = self._live.network.gate
        current = self._settings.current
        states: dict[str, MfaState | None] = {}
        ended = 0
        for relay in relays:
            admission = relay.admission
            ip_verdict = gate.decide(admission.client_ip)
            if ip_verdict.decision is not Decision.ALLOWED:
                ended += self._end(relay, POLICY_VIOLATION, ip_verdict.decision)
                continue
            identity = admission.identity
            if not mfa_gate_applies(identity, admission.raw_path, config.mfa):
                continue
            user = identity.user_id
            if user not in states:
                try:
                    states[user] = await self._service.state(user)
                except StoreUnavailable:
                    states[user] = None
            state = states[user]
            if state is None or current is None:
                ended += self._end(relay, TRY_AGAIN_LATER, Decision.STORE_UNAVAILABLE)
                continue
            try:
                verdict = await mfa_verdict(
                    identity,
                    admission.session or _NO_SESSION,
                    current=current,
                    state=state,
                    config=config,
                    service=self._service,
                )
            except StoreUnavailable:
                ended += self._end(relay, TRY_AGAIN_LATER, Decision.STORE_UNAVAILABLE)
                continue
            if verdict.decision not in _PASSING:
                ended += self._end(relay, POLICY_VIOLATION, verdict.decision)
        return ended

    def _end(self, relay: RelayedWebSocket, code: int, decision: Decision) -> int:
        if relay.ended.done():
            return 0
        relay.end(code, decision.value)
        admission = relay.admission
        log.info(
            "websocket closed: no longer allowed",
            extra=fields(
                decision=decision.value,
                code=code,
                client_ip=str(admission.client_ip),
                user=admission.identity.user_id if admission.identity else None,
            ),
        )
        return 1

    async def run(self) -> None:
        """Review every period, and at once when woken; never stops on an error."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every):
                    await self._woken.wait()
            self._woken.clear()
            try:
                await self.review()
            except Exception:
                log.exception("websocket review failed")

    def lifecycle(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """A cleanup context running :meth:`run` while the app runs."""

        async def context(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.get_running_loop().create_task(self.run())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return context
