"""The persistence interface: everything the sidecar keeps between requests and replicas.

One store, reached by aggregate (``store.users``, ``store.mfa``, ``store.lockout``,
``store.settings``, ``store.audit``), each behind a small protocol; one implementation for
SQLite (embedded) and PostgreSQL (several replicas) sharing schema and queries.

Promises every implementation keeps:

- **User ids are exact.** Every piece of state is keyed by the id the console reports, byte
  for byte: no case folding, trimming or Unicode normalisation (``kate`` and ``KATE`` are two
  users, as they are to the console).
- **Single use is atomic.** A TOTP time step, a recovery code, a WebAuthn challenge and a
  lockout attempt are each consumed or reserved by one conditional statement, so two
  replicas or two concurrent requests can never both succeed past a limit.
- **Method changes are conditional.** Adding or removing a user's MFA method happens in one
  transaction that also checks the user's MFA generation (or, for a first enrollment, that
  the user has no method yet); a reset bumps the generation and removes everything in one
  transaction. A change racing a reset therefore either happens before it (and is removed by
  it) or is refused.
- Times are timezone-aware UTC ``datetime`` values from the caller (the server clock), never
  taken inside the store; a naive ``datetime`` is a caller error (``ValueError``). Database
  failures are :class:`StoreUnavailable`: callers fail closed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class StoreUnavailable(Exception):
    """The database cannot be reached or failed; callers fail closed."""


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str  # exactly as the console reports it
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
class PendingTotp:
    """A secret shown for enrollment, not confirmed yet."""

    secret: str
    session_id: str  # the sidecar session that began the enrollment
    created_at: datetime


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
    failures: int  # failures (and attempts in flight) inside the current window


@dataclass(frozen=True, slots=True)
class ReservedKey:
    key: str
    window_start: datetime  # the window the attempt was counted in
    failures: int  # the count including this attempt
    limit: int
    banned_by_this: bool  # this attempt used the last one: the key is banned unless it succeeds


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to "may one more secret be checked?": either every key counted one more
    attempt (``reserved``), or none did and ``status`` says until when they are locked."""

    reserved: bool
    status: LockoutStatus
    keys: tuple[ReservedKey, ...] = ()

    @property
    def banned_by_this(self) -> bool:
        return any(k.banned_by_this for k in self.keys)

    def attempts_left(self) -> int:
        """Attempts still allowed in the window after this one (the tightest key)."""
        return min((k.limit - k.failures for k in self.keys), default=0)


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """The live, store-held security settings (edited by the Security page)."""

    mfa_policy: str  # optional | admins | all
    grace_period_seconds: float
    ip_allowlist: tuple[str, ...]
    ip_denylist: tuple[str, ...]
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


@dataclass(frozen=True, slots=True)
class RekeyedUser:
    """A user whose MFA state was re-keyed from a case-folded key to the exact id (migration
    to exact ids): other ids that folded to ``old_key`` shared this state until then."""

    old_key: str
    new_id: str
    rekeyed_at: datetime


# --- protocols, by aggregate -----------------------------------------------------------------


class UserStore(Protocol):
    async def touch(
        self, user_id: str, *, email: str | None, role: str | None, now: datetime
    ) -> UserRecord:
        """Insert or update the user's last-seen details; returns the record."""

    async def all(self) -> list[UserRecord]:
        """Every user ever seen, ordered by id."""

    async def grace_started(self, user_id: str, now: datetime) -> datetime:
        """When the user's grace clock started; starts it at ``now`` the first time
        (insert-if-absent: concurrent first calls on any replica agree on one start). A
        clock is removed only by a policy change that starts or lifts the user's
        requirement (``SettingsStore.save``), never by a role change or a new session."""

    async def grace_starts(self) -> dict[str, datetime]:
        """Every running grace clock (user id -> start), for previews and gauges."""

    async def rekeyed(self) -> list[RekeyedUser]:
        """Users re-keyed by the migration to exact ids (``sidecar store check``)."""


class MfaStore(Protocol):
    """A user's MFA methods. ``expected_generation`` on a change: an ``int`` is the generation
    the caller's session was verified under (refused when it moved); ``None`` means a first
    enrollment (refused when the user has a method by then, or when the caller's console
    session, ``binding``, was revoked by a reset). Changes return the user's
    generation after the change (the one a session may now be verified under), or ``None``
    when refused."""

    async def state(self, user_id: str) -> MfaState: ...

    async def enrolled_users(self) -> set[str]:
        """Ids of every user with a TOTP or passkey method (one query)."""

    async def reset(self, user_id: str) -> tuple[bool, int]:
        """Bump the generation, then remove every method, code, pending enrollment and
        ceremony of the user and revoke every console session that verified, in one
        transaction; (anything removed, new generation)."""

    async def record_binding(self, user_id: str, binding: str, now: datetime) -> None:
        """Remember that the console session ``binding`` verified MFA for the user (kept
        for 90 days after its last verification; a revoked one stays revoked)."""

    async def binding_revoked(self, user_id: str, binding: str) -> bool:
        """Whether a reset revoked this console session of the user."""

    # TOTP
    async def begin_totp(
        self, user_id: str, secret: str, *, session_id: str, now: datetime
    ) -> None:
        """Remember a secret shown for enrollment (replaces any earlier one)."""

    async def pending_totp(self, user_id: str) -> PendingTotp | None: ...

    async def confirm_totp(
        self,
        user_id: str,
        *,
        secret: str,
        step: int,
        session_id: str,
        issued_after: datetime,
        expected_generation: int | None,
        now: datetime,
        binding: str | None = None,
    ) -> int | None:
        """Make the pending ``secret`` the user's TOTP method with ``step`` as the last
        accepted time step, if it is still pending for ``session_id``, was begun after
        ``issued_after``, the user has no TOTP method and the generation condition holds (for
        a first enrollment: ``binding`` was not revoked by a reset)."""

    async def totp(self, user_id: str) -> TotpRecord | None: ...

    async def accept_totp_step(self, user_id: str, step: int, now: datetime) -> int | None:
        """Atomically record ``step`` as used if no step >= it was accepted before; the
        generation the verification counts for, or None."""

    async def remove_totp(self, user_id: str, *, expected_generation: int) -> int | None: ...

    # passkeys
    async def add_passkey(
        self, record: PasskeyRecord, *, expected_generation: int | None, binding: str | None = None
    ) -> int | None:
        """Store a new credential. A credential id already registered (to anyone) raises
        ``ValueError`` and changes nothing: credential ids are public, and overwriting one
        would hand its owner's sign-in to whoever registered it again."""

    async def passkeys(self, user_id: str) -> list[PasskeyRecord]: ...

    async def passkey(self, credential_id: bytes) -> PasskeyRecord | None: ...

    async def record_passkey_use(
        self,
        credential_id: bytes,
        *,
        old_sign_count: int,
        new_sign_count: int,
        backup_state: bool,
        now: datetime,
    ) -> int | None:
        """Record a use if the stored sign count is still ``old_sign_count`` (atomic); the
        owner's generation the verification counts for, or None."""

    async def remove_passkey(
        self, user_id: str, credential_id: bytes, *, expected_generation: int
    ) -> int | None: ...

    async def rename_passkey(self, user_id: str, credential_id: bytes, name: str) -> bool: ...

    # recovery codes
    async def replace_recovery_codes(
        self, user_id: str, code_hashes: list[bytes], *, expected_generation: int, now: datetime
    ) -> bool:
        """Store a fresh set, invalidating every earlier code, if the generation holds."""

    async def use_recovery_code(self, user_id: str, code_hash: bytes, now: datetime) -> int | None:
        """Atomically mark one unused code as used; the generation for exactly one caller."""

    async def recovery_codes_left(self, user_id: str) -> int: ...

    # WebAuthn
    async def user_handle(self, user_id: str) -> bytes:
        """A stable random WebAuthn user handle for the user (created on first use)."""

    async def user_for_handle(self, handle: bytes) -> str | None: ...

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


class LockoutStore(Protocol):
    """Failed-verification counters per key (``user:<id>``, ``ip:<address>``), shared by
    replicas. An attempt is *reserved* before its secret is checked: at most ``limit``
    attempts per key are ever checked in a window, whatever the concurrency."""

    async def status(self, keys: list[str], now: datetime) -> LockoutStatus:
        """The strictest status over ``keys``."""

    async def reserve(
        self,
        limits: Mapping[str, int],
        *,
        now: datetime,
        window_seconds: float,
        ban_seconds: float,
    ) -> Reservation:
        """Count one attempt against every key (``{key: limit}``) in one transaction, or
        against none when any key is banned or full. The attempt that uses a key's last
        slot bans it until ``now + ban``. The window is fixed: it opens at a key's first
        attempt and lasts ``window_seconds``; after it (or after a served ban) a new one
        opens. A failed attempt needs nothing more: it stays counted."""

    async def release(self, reservation: Reservation) -> None:
        """The reserved attempt succeeded: uncount it (in its window) and lift a ban it
        set. Earlier failures in the window stay counted."""


class SettingsStore(Protocol):
    async def current(self) -> SecuritySettings | None: ...

    async def version(self) -> int:
        """The current version (0 when never written): cheap, for replicas polling."""

    async def save(
        self,
        new: SecuritySettings,
        *,
        expected_version: int,
        restart_grace: Sequence[str] = (),
    ) -> SecuritySettings | None:
        """Write ``new`` as version ``expected_version + 1`` if the stored version is still
        ``expected_version`` (0 = never written); else None (someone else changed it). In
        the same transaction, the grace clocks of ``restart_grace`` (the users the policy
        change newly requires or releases) are removed: a new one starts when they are next
        seen required."""


class AuditStore(Protocol):
    async def append(
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

    async def entries(
        self,
        *,
        limit: int,
        action: str | None = None,
        actor: str | None = None,
        before_seq: int | None = None,
    ) -> list[AuditEntry]:
        """Newest first."""

    async def all(self) -> list[AuditEntry]:
        """Oldest first, for verifying the chain."""


class Store(Protocol):
    @property
    def users(self) -> UserStore: ...

    @property
    def mfa(self) -> MfaStore: ...

    @property
    def lockout(self) -> LockoutStore: ...

    @property
    def settings(self) -> SettingsStore: ...

    @property
    def audit(self) -> AuditStore: ...

    async def migrate(self) -> None:
        """Create or upgrade the schema (versioned migrations, applied at start). Safe to run
        from several processes at once; refuses (StoreUnavailable) a schema newer than the
        code."""

    async def ping(self) -> None:
        """Raise StoreUnavailable when the database cannot answer (for /readyz)."""

    async def close(self) -> None: ...
