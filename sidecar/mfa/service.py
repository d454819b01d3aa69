"""MFA operations on top of the store: cached state for the gate, counted attempts, enrollment,
recovery codes and resets, with their audit records and metrics.

The gate's questions ("is this user enrolled?", "when did their grace start?") are answered
from small in-memory caches: a user's MFA state for ``STATE_TTL`` seconds (so a change made on
another replica is seen within that time; changes made here invalidate at once) and grace
starts until the security settings move. Everything that changes a user's methods or checks
a step-up reads the store uncached (:meth:`MfaService.fresh_state`), and the store makes each change
conditional on the generation the caller's session was verified under.

Every secret a user presents (a TOTP code, at verification or when confirming an enrollment; a
recovery code; a passkey assertion) goes through :meth:`MfaService.attempt`: the attempt is
reserved in the lockout counters *before* the secret is checked, for the user and for the
client address (each with its own limit), so no concurrency gets more guesses checked.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.audit import AuditLog
from sidecar.config import Config
from sidecar.identity.base import role_is_privileged
from sidecar.mfa import recovery, totp
from sidecar.mfa.policy import MfaPolicy, Standing, grace_restarts, standing
from sidecar.store.base import (
    MfaState,
    PendingTotp,
    Store,
    StoreUnavailable,
)

log = logging.getLogger("sidecar.mfa")

STATE_TTL = 5.0
TOUCH_EVERY = 300.0
MAX_CACHED_USERS = 50_000
#: How long a TOTP secret shown for enrollment may be confirmed.
PENDING_TOTP_SECONDS = 600.0

K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entries."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)


class MfaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.enrollments_total = Counter(
            "sidecar_mfa_enrollments_total", "MFA methods enrolled", ["method"], registry=registry
        )
        self.verifications_total = Counter(
            "sidecar_mfa_verifications_total",
            "MFA verification attempts",
            ["method", "result"],
            registry=registry,
        )
        self.users = Gauge(
            "sidecar_mfa_users",
            "Known users by MFA state (enrolled; required but in grace; required and overdue)",
            ["state"],
            registry=registry,
            multiprocess_mode="max",  # every worker computes the same counts from the store
        )
        for method in ("totp", "passkey", "recovery_code"):
            if method != "recovery_code":
                self.enrollments_total.labels(method)
            for result in ("success", "failure", "locked"):
                self.verifications_total.labels(method, result)
        for state in ("enrolled", "grace", "overdue"):
            self.users.labels(state).set(0)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who does something, for audit records and lockout counters."""

    user: str
    client_ip: str | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """How a counted attempt went. ``generation``: the user's MFA generation the success
    counts for (the session is verified under it). When refused or failed, ``locked_until``
    is set if the user or address is now banned (``locked_by``: ``user`` or ``address``), and
    ``attempts_left`` says how many more the tightest counter allows in this window."""

    generation: int | None
    locked_until: datetime | None = None
    locked_by: str | None = None
    attempts_left: int = 0
    checked: bool = True  # False: refused before the secret was looked at

    @property
    def ok(self) -> bool:
        return self.generation is not None


def user_lockout_key(user_id: str) -> str:
    return f"user:{user_id}"


def address_lockout_key(client_ip: str) -> str:
    return f"ip:{client_ip}"


class MfaService:
    def __init__(
        self,
        *,
        store: Store,
        config: Config,
        audit: AuditLog,
        metrics: MfaMetrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.audit = audit
        self.metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._states: _Lru[str, tuple[float, MfaState]] = _Lru(MAX_CACHED_USERS)
        self._grace: _Lru[tuple[str, int], datetime] = _Lru(MAX_CACHED_USERS)
        self._touched: _Lru[str, float] = _Lru(MAX_CACHED_USERS)
        self._code_key = recovery.hashing_key(config.storage.encryption_key)

    def now(self) -> datetime:
        return self._clock()

    # --- what the gate asks ----------------------------------------------------------------

    async def state(self, user_id: str) -> MfaState:
        """The user's MFA state, cached for STATE_TTL (the gate); raises StoreUnavailable."""
        cached = self._states.get(user_id)
        now = self._monotonic()
        if cached is not None and now - cached[0] < STATE_TTL:
            return cached[1]
        return await self.fresh_state(user_id)

    async def fresh_state(self, user_id: str) -> MfaState:
        """The user's MFA state read from the store now (step-up checks, method changes)."""
        state = await self.store.mfa.state(user_id)
        self._states.put(user_id, (self._monotonic(), state))
        return state

    def forget(self, user_id: str) -> None:
        self._states.pop(user_id)

    async def grace_started(self, user_id: str, *, settings_version: int) -> datetime:
        """The user's grace start, cached until the settings move (a policy change may
        have restarted it, on any replica)."""
        key = (user_id, settings_version)
        start = self._grace.get(key)
        if start is None:
            start = await self.store.users.grace_started(user_id, self.now())
            self._grace.put(key, start)
        return start

    async def touch(self, user_id: str, *, email: str | None, role: str | None) -> None:
        """Remember the user (for the Security page preview and the gauges), at most every
        few minutes per user."""
        now = self._monotonic()
        last = self._touched.get(user_id)
        if last is not None and now - last < TOUCH_EVERY:
            return
        try:
            await self.store.users.touch(user_id, email=email, role=role, now=self.now())
        except StoreUnavailable as exc:
            # Bookkeeping only (the Security page preview, the gauges): never a reason to
            # refuse a request that could otherwise be decided. Tried again next time.
            log.warning("could not record the user as seen: %s", exc)
            return
        self._touched.put(user_id, now)

    # --- counted attempts ------------------------------------------------------------------

    def lockout_limits(self, actor: Actor) -> dict[str, int]:
        lockout = self.config.mfa.lockout
        limits = {user_lockout_key(actor.user): lockout.max_failures}
        if actor.client_ip:
            limits[address_lockout_key(actor.client_ip)] = lockout.max_failures_per_address
        return limits

    async def lockout_status(self, actor: Actor) -> tuple[datetime | None, str | None]:
        """Until when (and by which counter) the actor is locked out now, if at all."""
        now = self.now()
        user = await self.store.lockout.status([user_lockout_key(actor.user)], now)
        if user.locked_until is not None:
            return user.locked_until, "user"
        if actor.client_ip:
            address = await self.store.lockout.status([address_lockout_key(actor.client_ip)], now)
            if address.locked_until is not None:
                return address.locked_until, "address"
        return None, None

    async def attempt(
        self,
        method: str,
        actor: Actor,
        check: Callable[[], Awaitable[int | None]],
        *,
        action: str = "mfa.verify",
    ) -> Attempt:
        """Reserve an attempt for the actor (user and address), then ``check`` the secret.

        ``check`` returns the generation the success counts for, or None for a wrong secret.
        A success releases the reservation; a failure stays counted and is audited (with a
        ``mfa.lockout`` record when it used the last attempt). If ``check`` raises, the
        attempt stays counted: the secret may have been looked at.
        """
        lockout = self.config.mfa.lockout
        reservation = await self.store.lockout.reserve(
            self.lockout_limits(actor),
            now=self.now(),
            window_seconds=lockout.window,
            ban_seconds=lockout.ban,
        )
        if not reservation.reserved:
            self.metrics.verifications_total.labels(method, "locked").inc()
            until, by = await self.lockout_status(actor)
            return Attempt(
                None,
                locked_until=until or reservation.status.locked_until,
                locked_by=by or "user",
                checked=False,
            )
        generation = await check()
        if generation is not None:
            try:
                await self.store.lockout.release(reservation)
            except StoreUnavailable as exc:
                # The secret was right and is consumed; the user merely keeps one attempt
                # fewer in this window.
                log.warning("could not release a lockout reservation: %s", exc)
            self.metrics.verifications_total.labels(method, "success").inc()
            await self.audit.record(
                action, actor=actor.user, client_ip=actor.client_ip, method=method
            )
            return Attempt(generation)
        self.metrics.verifications_total.labels(method, "failure").inc()
        await self.audit.record(
            action,
            actor=actor.user,
            client_ip=actor.client_ip,
            outcome="failure",
            method=method,
            reason="wrong_secret",
        )
        banned = [k for k in reservation.keys if k.banned_by_this]
        if not banned:
            return Attempt(None, attempts_left=reservation.attempts_left())
        locked_by = "user" if any(k.key.startswith("user:") for k in banned) else "address"
        await self.audit.record(
            "mfa.lockout",
            actor=actor.user,
            client_ip=actor.client_ip,
            outcome="locked",
            method=method,
            scope=locked_by,
            locked_until=reservation.status.locked_until,
            failures=max(k.failures for k in banned),
        )
        return Attempt(None, locked_until=reservation.status.locked_until, locked_by=locked_by)

    # --- TOTP ------------------------------------------------------------------------------

    async def begin_totp(
        self, user_id: str, account: str, *, session_id: str
    ) -> tuple[str, str, str]:
        """A new pending secret bound to the session: (secret, otpauth URI, QR as SVG)."""
        secret = totp.new_secret()
        await self.store.mfa.begin_totp(user_id, secret, session_id=session_id, now=self.now())
        uri = totp.provisioning_uri(secret, account=account, issuer=self.config.mfa.rp_name)
        return secret, uri, totp.qr_svg(uri)

    async def pending_totp(self, user_id: str, *, session_id: str) -> PendingTotp | None:
        """The secret this session is enrolling, unless it expired or was discarded."""
        pending = await self.store.mfa.pending_totp(user_id)
        if (
            pending is None
            or pending.session_id != session_id
            or pending.created_at <= self.pending_cutoff()
        ):
            return None
        return pending

    def pending_cutoff(self) -> datetime:
        return self.now() - timedelta(seconds=PENDING_TOTP_SECONDS)

    def totp_step(self, secret: str, code: str) -> int | None:
        """The time step ``code`` is valid for under ``secret`` now, or None."""
        return totp.matching_step(secret, code, now=self.now().timestamp())

    async def enrolled(self, user_id: str, actor: Actor, method: str, **details: Any) -> None:
        """After a method was added: fresh state, the metric, the audit record."""
        self.forget(user_id)
        self.metrics.enrollments_total.labels(method).inc()
        await self.audit.record(
            "mfa.enrolled", actor=actor.user, client_ip=actor.client_ip, method=method, **details
        )

    async def check_totp(self, user_id: str, code: str) -> int | None:
        """The generation for a correct code whose time step was never accepted before."""
        record = await self.store.mfa.totp(user_id)
        if record is None:
            return None
        step = self.totp_step(record.secret, code)
        if step is None:
            return None
        return await self.store.mfa.accept_totp_step(user_id, step, self.now())

    async def methods_removed(self, user_id: str, actor: Actor, method: str) -> None:
        """After a method was removed (the store ended other sessions): audit it."""
        self.forget(user_id)
        await self.audit.record(
            "mfa.removed",
            actor=actor.user,
            client_ip=actor.client_ip,
            target=user_id,
            method=method,
        )

    # --- recovery codes --------------------------------------------------------------------

    async def new_recovery_codes(
        self, user_id: str, actor: Actor, *, first: bool, expected_generation: int
    ) -> list[str] | None:
        """A fresh set (shown once), or None when the generation moved meanwhile."""
        codes = recovery.generate()
        hashes = [recovery.code_hash(self._code_key, c) for c in codes]
        saved = await self.store.mfa.replace_recovery_codes(
            user_id,
            [h for h in hashes if h is not None],
            expected_generation=expected_generation,
            now=self.now(),
        )
        if not saved:
            return None
        self.forget(user_id)
        await self.audit.record(
            "mfa.recovery_codes.issued" if first else "mfa.recovery_codes.regenerated",
            actor=actor.user,
            client_ip=actor.client_ip,
            count=len(codes),
        )
        return codes

    async def check_recovery_code(self, user_id: str, code: str, actor: Actor) -> int | None:
        digest = recovery.code_hash(self._code_key, code)
        if digest is None:
            return None
        generation = await self.store.mfa.use_recovery_code(user_id, digest, self.now())
        if generation is not None:
            self.forget(user_id)
            left = await self.store.mfa.recovery_codes_left(user_id)
            await self.audit.record(
                "mfa.recovery_code.used",
                actor=actor.user,
                client_ip=actor.client_ip,
                remaining=left,
            )
        return generation

    # --- admin -----------------------------------------------------------------------------

    async def reset(self, user_id: str, actor: Actor) -> bool:
        """Remove every method of a member (admin reset, break-glass CLI), in one
        transaction that first moves the generation (every verified session ends)."""
        removed, _ = await self.store.mfa.reset(user_id)
        self.forget(user_id)
        await self.audit.record(
            "mfa.reset",
            actor=actor.user,
            client_ip=actor.client_ip,
            target=user_id,
            outcome="success" if removed else "nothing_to_remove",
        )
        return removed

    # --- rollout gauges --------------------------------------------------------------------

    async def standings(
        self,
        *,
        policy: MfaPolicy,
        grace_period: float,
        current: MfaPolicy | None = None,
    ) -> dict[str, Standing]:
        """Every known user's standing under ``policy`` (the live one, or a proposed change
        from ``current``: the users it newly requires or releases would start a clock when
        next seen), by their last-seen role; one query per table."""
        roles = self.config.identity.admin_roles
        starts = await self.store.users.grace_starts()
        enrolled = await self.store.mfa.enrolled_users()
        users = await self.store.users.all()
        privileged = {u.user_id: role_is_privileged(u.role, roles) for u in users}
        restarting = set(grace_restarts(current, policy, privileged.items()))
        now = self.now()
        period = timedelta(seconds=grace_period)
        return {
            user.user_id: standing(
                policy=policy,
                privileged=privileged[user.user_id],
                enrolled=user.user_id in enrolled,
                grace_started=None if user.user_id in restarting else starts.get(user.user_id),
                grace_period=period,
                now=now,
            )
            for user in users
        }

    async def refresh_user_gauges(
        self, *, policy: MfaPolicy, grace_period: float
    ) -> dict[str, int]:
        """``sidecar_mfa_users{state}``: enrolled, required-in-grace, required-and-overdue."""
        counts = {"enrolled": 0, "grace": 0, "overdue": 0}
        for user_standing in (
            await self.standings(policy=policy, grace_period=grace_period)
        ).values():
            if user_standing.value in counts:
                counts[user_standing.value] += 1
        for state_name, count in counts.items():
            self.metrics.users.labels(state_name).set(count)
        return counts
