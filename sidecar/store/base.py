"""The persistence interface: everything the sidecar keeps between requests and replicas.

One interface, two implementations sharing schema and queries (SQLite embedded, PostgreSQL for
several replicas). Every single-use operation (a TOTP time step, a recovery code, a WebAuthn
challenge) is one atomic conditional statement, so two replicas or two concurrent requests can
never both succeed. Times are timezone-aware UTC ``datetime`` values from the caller (the
server clock), never taken inside the store, so behaviour is testable; a naive ``datetime``
is a caller error (``ValueError``).

User ids are compared case-insensitively: the store keys users by ``user_key(id)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class StoreUnavailable(Exception):
    """The database cannot be reached or failed; callers fail closed."""


def user_key(user_id: str) -> str:
    """The canonical form of a user id for storage and counting (case-insensitive)."""
    return user_id.strip().casefold()


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str  # the canonical key (user_key)
    display_id: str  # as the console reported it the last time
    email: str | None
    role: str | None
    first_seen: datetime
    last_seen: datetime
    mfa_generation: int  # bumped when methods are removed/reset: verified sessions end


@dataclass(frozen=True, slots=True)
class TotpRecord:
    secret: str  # decrypted base32 secret
    last_step: int | None  # the last accepted time step (replay guard)
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class PasskeyRecord:
    credential_id: bytes
    user_id: str
    public_key: bytes
    sign_count: int
    transports: tuple[str, ...]
    aaguid: str
    backup_eligible: bool
    backup_state: bool
    name: str
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class MfaState:
    """What the MFA gate needs to know about one user."""

    totp: bool
    passkeys: int
    recovery_codes_left: int
    mfa_generation: int

    @property
    def enrolled(self) -> bool:
        return self.totp or self.passkeys > 0


@dataclass(frozen=True, slots=True)
class LockoutStatus:
    locked_until: datetime | None  # set while banned
    failures: int  # failures inside the current window


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """The live, store-held security settings (edited by the Security page)."""

    mfa_policy: str  # optional | admins | all
    grace_period_seconds: float
    ip_allowlist: tuple[str, ...]
    ip_denylist: tuple[str, ...]
    policy_epoch: int  # incremented whenever the policy is tightened: grace clocks restart
    version: int  # incremented on every change (optimistic concurrency, replica polling)
    updated_by: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    time: datetime
    actor: str | None
    client_ip: str | None
    action: str
    target: str | None
    outcome: str
    details: str  # JSON text
    prev_hash: str
    hash: str


class Store(Protocol):
    # lifecycle ---------------------------------------------------------------------------
    async def migrate(self) -> None:
        """Create or upgrade the schema (versioned migrations, applied at start). Safe to run
        from several processes at once; refuses (StoreUnavailable) a schema newer than the
        code."""

    async def ping(self) -> None:
        """Raise StoreUnavailable when the database cannot answer (for /readyz)."""

    async def close(self) -> None: ...

    # users and grace ---------------------------------------------------------------------
    async def touch_user(
        self, user_id: str, *, email: str | None, role: str | None, now: datetime
    ) -> UserRecord:
        """Insert or update the user's last-seen details; returns the record."""

    async def list_users(self) -> list[UserRecord]: ...

    async def grace_started(self, user_id: str, epoch: int, now: datetime) -> datetime:
        """When the user's grace clock for ``epoch`` started; starts it at ``now`` if this is
        the first time (insert-if-absent, so concurrent replicas agree on one start)."""

    async def grace_starts(self, epoch: int) -> dict[str, datetime]:
        """All grace starts for one epoch (user key -> start), for previews and gauges."""

    async def mfa_state(self, user_id: str) -> MfaState: ...

    async def enrolled_user_keys(self) -> set[str]:
        """Keys of every user with a TOTP or passkey method (one query, for gauges and the
        Security page preview)."""

    async def bump_mfa_generation(self, user_id: str) -> int:
        """Invalidate verified sessions of the user (after a reset or method removal); returns
        the new generation. Works for any user id, recorded by ``touch_user`` or not."""

    # TOTP -------------------------------------------------------------------------------
    async def set_pending_totp(self, user_id: str, secret: str, now: datetime) -> None:
        """Remember a secret shown for enrollment until it is confirmed (replaces any)."""

    async def pending_totp(self, user_id: str) -> str | None: ...

    async def confirm_totp(self, user_id: str, secret: str, step: int, now: datetime) -> bool:
        """Make ``secret`` the user's TOTP method, with ``step`` as the last accepted time
        step, if it is still the pending one; clears the pending secret."""

    async def totp(self, user_id: str) -> TotpRecord | None: ...

    async def accept_totp_step(self, user_id: str, step: int, now: datetime) -> bool:
        """Atomically record ``step`` as used: true only if no step >= it was accepted
        before (``UPDATE ... WHERE last_step IS NULL OR last_step < :step``)."""

    async def delete_totp(self, user_id: str) -> bool: ...

    # recovery codes ---------------------------------------------------------------------
    async def replace_recovery_codes(
        self, user_id: str, code_hashes: list[bytes], now: datetime
    ) -> None:
        """Store a fresh set, invalidating every earlier code of the user."""

    async def use_recovery_code(self, user_id: str, code_hash: bytes, now: datetime) -> bool:
        """Atomically mark one unused code as used; true for exactly one caller."""

    async def recovery_codes_left(self, user_id: str) -> int: ...

    # passkeys ---------------------------------------------------------------------------
    async def user_handle(self, user_id: str) -> bytes:
        """A stable random WebAuthn user handle for the user (created on first use)."""

    async def user_for_handle(self, handle: bytes) -> str | None: ...

    async def add_passkey(self, record: PasskeyRecord) -> None:
        """Store a new credential. A credential id already registered (to anyone) raises
        ``ValueError`` and changes nothing: credential ids are public, and overwriting one
        would hand its owner's sign-in to whoever registered it again."""

    async def passkeys(self, user_id: str) -> list[PasskeyRecord]: ...

    async def passkey(self, credential_id: bytes) -> PasskeyRecord | None: ...

    async def update_passkey_use(
        self,
        credential_id: bytes,
        *,
        old_sign_count: int,
        new_sign_count: int,
        backup_state: bool,
        now: datetime,
    ) -> bool:
        """Record a use if the stored sign count is still ``old_sign_count`` (atomic)."""

    async def delete_passkey(self, user_id: str, credential_id: bytes) -> bool: ...

    async def rename_passkey(self, user_id: str, credential_id: bytes, name: str) -> bool: ...

    # WebAuthn challenges ----------------------------------------------------------------
    async def put_challenge(
        self,
        challenge_id: str,
        *,
        user_id: str,
        session_id: str,
        purpose: str,
        challenge: bytes,
        expires_at: datetime,
    ) -> None: ...

    async def take_challenge(
        self, challenge_id: str, *, user_id: str, session_id: str, purpose: str, now: datetime
    ) -> bytes | None:
        """Delete and return the challenge if it matches user, session and purpose and has not
        expired; at most one caller ever gets it."""

    # lockout ----------------------------------------------------------------------------
    async def lockout_status(self, keys: list[str], now: datetime) -> LockoutStatus:
        """The strictest status over ``keys`` (e.g. ``user:alice`` and ``ip:203.0.113.9``)."""

    async def record_failure(
        self,
        keys: list[str],
        *,
        now: datetime,
        window_seconds: float,
        max_failures: int,
        ban_seconds: float,
    ) -> LockoutStatus:
        """Count one failure against each key (failures older than the window expire); a key
        reaching ``max_failures`` is banned until ``now + ban``. Returns the strictest.

        The window is fixed: it opens at a key's first failure and lasts ``window_seconds``
        (as configured then); the next failure after it, or after a served ban, opens a new
        one. Failures during a ban are counted but do not extend it."""

    async def clear_failures(self, keys: list[str]) -> None:
        """Forget the keys' failures and bans (e.g. the user key after a success)."""

    # security settings ------------------------------------------------------------------
    async def settings(self) -> SecuritySettings | None: ...

    async def settings_version(self) -> int:
        """The current version (0 when never written): cheap, for replicas polling."""

    async def save_settings(
        self, new: SecuritySettings, *, expected_version: int
    ) -> SecuritySettings | None:
        """Write ``new`` as version ``expected_version + 1`` if the stored version is still
        ``expected_version`` (0 = never written); else None (someone else changed it)."""

    # audit ------------------------------------------------------------------------------
    async def append_audit(
        self,
        *,
        time: datetime,
        actor: str | None,
        client_ip: str | None,
        action: str,
        target: str | None,
        outcome: str,
        details: str,
    ) -> AuditEntry:
        """Append a record chained to the previous one by hash (serialized across
        replicas), returning it with its sequence number and hash."""

    async def audit_entries(
        self,
        *,
        limit: int,
        action: str | None = None,
        actor: str | None = None,
        before_seq: int | None = None,
    ) -> list[AuditEntry]:
        """Newest first."""

    async def all_audit_entries(self) -> list[AuditEntry]:
        """Oldest first, for verifying the chain."""
