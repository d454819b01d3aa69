"""MFA operations on top of the store: cached state for the gate, enrollment, verification,
lockout, recovery codes, with their audit records and metrics.

The gate's questions ("is this user enrolled?", "when did their grace start?") are answered
from small in-memory caches: a user's MFA state for ``STATE_TTL`` seconds (so a change made on
another replica is seen within that time; changes made here invalidate at once) and grace
starts for good (a start never moves once written).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.audit import AuditLog
from sidecar.config import Config
from sidecar.mfa import recovery, totp
from sidecar.mfa.policy import MfaPolicy, is_required
from sidecar.store.base import LockoutStatus, MfaState, Store, StoreUnavailable, user_key

log = logging.getLogger("sidecar.mfa")

STATE_TTL = 5.0
TOUCH_EVERY = 300.0
MAX_CACHED_USERS = 50_000

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
    """Who does something, for audit records."""

    user: str
    client_ip: str | None


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
        """The user's MFA state, cached for STATE_TTL; raises StoreUnavailable."""
        key = user_key(user_id)
        cached = self._states.get(key)
        now = self._monotonic()
        if cached is not None and now - cached[0] < STATE_TTL:
            return cached[1]
        state = await self.store.mfa_state(key)
        self._states.put(key, (now, state))
        return state

    def forget(self, user_id: str) -> None:
        self._states.pop(user_key(user_id))

    async def grace_started(self, user_id: str, epoch: int) -> datetime:
        key = (user_key(user_id), epoch)
        start = self._grace.get(key)
        if start is None:
            start = await self.store.grace_started(key[0], epoch, self.now())
            self._grace.put(key, start)
        return start

    async def touch(self, user_id: str, *, email: str | None, role: str | None) -> None:
        """Remember the user (for the Security page preview and the gauges), at most every
        few minutes per user."""
        key = user_key(user_id)
        now = self._monotonic()
        last = self._touched.get(key)
        if last is not None and now - last < TOUCH_EVERY:
            return
        try:
            await self.store.touch_user(user_id, email=email, role=role, now=self.now())
        except StoreUnavailable as exc:
            # Bookkeeping only (the Security page preview, the gauges): never a reason to
            # refuse a request that could otherwise be decided. Tried again next time.
            log.warning("could not record the user as seen: %s", exc)
            return
        self._touched.put(key, now)

    # --- lockout ---------------------------------------------------------------------------

    @staticmethod
    def lockout_keys(user_id: str, client_ip: str | None) -> list[str]:
        keys = [f"user:{user_key(user_id)}"]
        if client_ip:
            keys.append(f"ip:{client_ip}")
        return keys

    async def lockout(self, user_id: str, client_ip: str | None) -> LockoutStatus:
        return await self.store.lockout_status(self.lockout_keys(user_id, client_ip), self.now())

    async def failed(self, method: str, actor: Actor) -> LockoutStatus:
        lockout = self.config.mfa.lockout
        status = await self.store.record_failure(
            self.lockout_keys(actor.user, actor.client_ip),
            now=self.now(),
            window_seconds=lockout.window,
            max_failures=lockout.max_failures,
            ban_seconds=lockout.ban,
        )
        self.metrics.verifications_total.labels(method, "failure").inc()
        await self.audit.record(
            "mfa.verify",
            actor=actor.user,
            client_ip=actor.client_ip,
            outcome="failure",
            method=method,
        )
        if status.locked_until is not None:
            await self.audit.record(
                "mfa.lockout",
                actor=actor.user,
                client_ip=actor.client_ip,
                outcome="locked",
                method=method,
                locked_until=status.locked_until.isoformat(),
                failures=status.failures,
            )
        return status

    async def succeeded(self, method: str, actor: Actor) -> None:
        await self.store.clear_failures([f"user:{user_key(actor.user)}"])
        self.metrics.verifications_total.labels(method, "success").inc()
        await self.audit.record(
            "mfa.verify", actor=actor.user, client_ip=actor.client_ip, method=method
        )

    # --- TOTP ------------------------------------------------------------------------------

    async def begin_totp(self, user_id: str, account: str) -> tuple[str, str, str]:
        """A new pending secret: (secret, otpauth URI, QR as inline SVG)."""
        secret = totp.new_secret()
        await self.store.set_pending_totp(user_key(user_id), secret, self.now())
        uri = totp.provisioning_uri(secret, account=account, issuer=self.config.mfa.rp_name)
        return secret, uri, totp.qr_svg(uri)

    async def finish_totp(self, user_id: str, code: str, actor: Actor) -> bool:
        key = user_key(user_id)
        secret = await self.store.pending_totp(key)
        if secret is None:
            return False
        step = totp.matching_step(secret, code, now=self.now().timestamp())
        if step is None or not await self.store.confirm_totp(key, secret, step, self.now()):
            return False
        await self.enrolled(user_id, actor, "totp")
        return True

    async def enrolled(self, user_id: str, actor: Actor, method: str, **details: Any) -> None:
        """After a method was added: fresh state, the metric, the audit record."""
        self.forget(user_id)
        self.metrics.enrollments_total.labels(method).inc()
        await self.audit.record(
            "mfa.enrolled", actor=actor.user, client_ip=actor.client_ip, method=method, **details
        )

    async def verify_totp(self, user_id: str, code: str) -> bool:
        """True for a correct code whose time step was never accepted before."""
        key = user_key(user_id)
        record = await self.store.totp(key)
        if record is None:
            return False
        step = totp.matching_step(record.secret, code, now=self.now().timestamp())
        return step is not None and await self.store.accept_totp_step(key, step, self.now())

    async def remove_totp(self, user_id: str, actor: Actor) -> bool:
        removed = await self.store.delete_totp(user_key(user_id))
        if removed:
            await self.methods_removed(user_id, actor, "totp")
        return removed

    async def methods_removed(self, user_id: str, actor: Actor, method: str) -> None:
        """After a method was removed: end verified sessions elsewhere, audit it."""
        await self.store.bump_mfa_generation(user_key(user_id))
        self.forget(user_id)
        await self.audit.record(
            "mfa.removed",
            actor=actor.user,
            client_ip=actor.client_ip,
            target=user_id,
            method=method,
        )

    # --- recovery codes --------------------------------------------------------------------

    async def new_recovery_codes(self, user_id: str, actor: Actor, *, first: bool) -> list[str]:
        codes = recovery.generate()
        hashes = [recovery.code_hash(self._code_key, c) for c in codes]
        await self.store.replace_recovery_codes(
            user_key(user_id), [h for h in hashes if h is not None], self.now()
        )
        self.forget(user_id)
        await self.audit.record(
            "mfa.recovery_codes.issued" if first else "mfa.recovery_codes.regenerated",
            actor=actor.user,
            client_ip=actor.client_ip,
            count=len(codes),
        )
        return codes

    async def use_recovery_code(self, user_id: str, code: str, actor: Actor) -> bool:
        digest = recovery.code_hash(self._code_key, code)
        if digest is None:
            return False
        used = await self.store.use_recovery_code(user_key(user_id), digest, self.now())
        if used:
            self.forget(user_id)
            left = await self.store.recovery_codes_left(user_key(user_id))
            await self.audit.record(
                "mfa.recovery_code.used",
                actor=actor.user,
                client_ip=actor.client_ip,
                remaining=left,
            )
        return used

    # --- admin -----------------------------------------------------------------------------

    async def reset(self, user_id: str, actor: Actor) -> bool:
        """Remove every method of a member (admin reset, break-glass CLI)."""
        key = user_key(user_id)
        removed = await self.store.delete_totp(key)
        for passkey in await self.store.passkeys(key):
            removed = await self.store.delete_passkey(key, passkey.credential_id) or removed
        await self.store.replace_recovery_codes(key, [], self.now())
        await self.store.bump_mfa_generation(key)
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

    async def refresh_user_gauges(
        self, *, policy: MfaPolicy, epoch: int, grace_period: float
    ) -> dict[str, int]:
        """Count known users: enrolled, required-in-grace, required-and-overdue."""
        counts = {"enrolled": 0, "grace": 0, "overdue": 0}
        starts = await self.store.grace_starts(epoch)
        enrolled = await self.store.enrolled_user_keys()
        now = self.now()
        admin_roles = {r.casefold() for r in self.config.identity.admin_roles}
        for user in await self.store.list_users():
            if user.user_id in enrolled:
                counts["enrolled"] += 1
                continue
            privileged = (user.role or "").casefold() in admin_roles
            if not is_required(policy, privileged):
                continue
            start = starts.get(user.user_id)
            if start is None or now < start + timedelta(seconds=grace_period):
                counts["grace"] += 1
            else:
                counts["overdue"] += 1
        for state_name, count in counts.items():
            self.metrics.users.labels(state_name).set(count)
        return counts
