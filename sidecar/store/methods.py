"""A user's MFA methods: TOTP, passkeys, recovery codes, WebAuthn challenges (``MfaStore``).

Every change to a user's methods runs in one write transaction that holds the user's lock
(a PostgreSQL advisory lock per user; SQLite write transactions are serialized anyway), reads
the user's generation and checks the caller's condition (see ``MfaStore``) before writing. A
reset bumps the generation first and removes everything in that same transaction. So a change
racing a reset, on this replica or another, either lands before the reset (and is removed by
it) or is refused: nothing added with a stale session survives a reset.

Single-use consumption (a time step, a recovery code, a sign count) is one conditional
``UPDATE``; its transaction also reads the owner's generation, which is what the caller's
session is then verified under. A consumption racing a reset either commits first (and the
reset then ends the session by moving the generation) or finds the method gone.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import RowMapping, delete, func, or_, select, union, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sidecar.store import schema
from sidecar.store.base import MfaState, PasskeyRecord, PendingTotp, StoreUnavailable, TotpRecord
from sidecar.store.db import LOCK_USER_MFA, Database

_HANDLE_BYTES = 32
#: Open WebAuthn ceremonies one user may have at once (a page needs one or two).
MAX_OPEN_CHALLENGES = 5
#: How long a console session that verified is remembered (for revocation by a reset).
BINDING_DAYS = 90


def json_list(values: Iterable[str]) -> str:
    return json.dumps(list(values), separators=(",", ":"))


def tuple_of_str(raw: str) -> tuple[str, ...]:
    values = json.loads(raw)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise StoreUnavailable("corrupt list column in the store")
    return tuple(values)


class SqlMfa:
    def __init__(self, db: Database) -> None:
        self._db = db

    # --- plumbing --------------------------------------------------------------------------

    async def _generation(self, conn: AsyncConnection, user_id: str) -> int:
        mfa = schema.user_mfa
        found: int | None = (
            await conn.execute(select(mfa.c.mfa_generation).where(mfa.c.user_key == user_id))
        ).scalar_one_or_none()
        return found or 0

    async def _has_method(self, conn: AsyncConnection, user_id: str) -> bool:
        t, p = schema.totp, schema.passkeys
        query = union(
            select(t.c.user_key).where(t.c.user_key == user_id),
            select(p.c.user_key).where(p.c.user_key == user_id),
        )
        return (await conn.execute(query)).first() is not None

    async def _holds(
        self,
        conn: AsyncConnection,
        user_id: str,
        expected_generation: int | None,
        binding: str | None = None,
    ) -> int | None:
        """Take the user's lock and check the condition of a change (see ``MfaStore``);
        the current generation when it holds. A first enrollment also needs a console
        session (``binding``) that a reset has not revoked."""
        await self._db.lock(conn, LOCK_USER_MFA, user_id)
        generation = await self._generation(conn, user_id)
        if expected_generation is None:
            if await self._has_method(conn, user_id):
                return None
            if binding is not None and await self._revoked(conn, user_id, binding):
                return None
            return generation
        return generation if generation == expected_generation else None

    async def _revoked(self, conn: AsyncConnection, user_id: str, binding: str) -> bool:
        vb = schema.verified_bindings
        row = (
            await conn.execute(
                select(vb.c.revoked).where(vb.c.user_key == user_id, vb.c.binding == binding)
            )
        ).first()
        return row is not None and bool(row.revoked)

    async def _bump(self, conn: AsyncConnection, user_id: str) -> int:
        mfa = schema.user_mfa
        stmt = (
            self._db.insert(mfa)
            .values(user_key=user_id, mfa_generation=1, webauthn_handle=None)
            .on_conflict_do_update(
                index_elements=[mfa.c.user_key],
                set_={"mfa_generation": mfa.c.mfa_generation + 1},
            )
            .returning(mfa.c.mfa_generation)
        )
        generation: int = (await conn.execute(stmt)).scalar_one()
        return generation

    async def _discard_pending(self, conn: AsyncConnection, user_id: str) -> None:
        """A method was added, removed or reset: enrollments and ceremonies begun before it
        are void (they were judged against the old state)."""
        await conn.execute(
            delete(schema.pending_totp).where(schema.pending_totp.c.user_key == user_id)
        )
        await conn.execute(delete(schema.challenges).where(schema.challenges.c.user_key == user_id))

    # --- state -----------------------------------------------------------------------------

    async def state(self, user_id: str) -> MfaState:
        t, p, r, u = schema.totp, schema.passkeys, schema.recovery_codes, schema.user_mfa
        query = select(
            select(func.count()).select_from(t).where(t.c.user_key == user_id).scalar_subquery(),
            select(func.count()).select_from(p).where(p.c.user_key == user_id).scalar_subquery(),
            select(func.count())
            .select_from(r)
            .where(r.c.user_key == user_id, r.c.used_at.is_(None))
            .scalar_subquery(),
            select(u.c.mfa_generation).where(u.c.user_key == user_id).scalar_subquery(),
        )
        async with self._db.transaction(write=False, operation="mfa.state") as conn:
            has_totp, passkeys, codes, generation = (await conn.execute(query)).one()
        return MfaState(
            totp=bool(has_totp),
            passkeys=int(passkeys),
            recovery_codes_left=int(codes),
            mfa_generation=int(generation or 0),
        )

    async def enrolled_users(self) -> set[str]:
        t, p = schema.totp, schema.passkeys
        query = union(select(t.c.user_key), select(p.c.user_key))
        async with self._db.transaction(write=False, operation="mfa.enrolled_users") as conn:
            return {row[0] for row in await conn.execute(query)}

    async def reset(self, user_id: str) -> tuple[bool, int]:
        async with self._db.transaction(write=True, operation="mfa.reset") as conn:
            await self._db.lock(conn, LOCK_USER_MFA, user_id)
            # The generation moves first: from here on no session verified before the reset
            # counts, and no conditional change begun before it can commit after it.
            generation = await self._bump(conn, user_id)
            removed = 0
            for table in (schema.totp, schema.passkeys):
                removed += (
                    await conn.execute(delete(table).where(table.c.user_key == user_id))
                ).rowcount
            codes = schema.recovery_codes
            await conn.execute(delete(codes).where(codes.c.user_key == user_id))
            await self._discard_pending(conn, user_id)
            # Whoever verified before the reset (perhaps the one it evicts) cannot enroll the
            # first new factor from that console session.
            vb = schema.verified_bindings
            await conn.execute(update(vb).where(vb.c.user_key == user_id).values(revoked=True))
        return removed > 0, generation

    async def record_binding(self, user_id: str, binding: str, now: datetime) -> None:
        vb = schema.verified_bindings
        stmt = self._db.insert(vb).values(
            user_key=user_id, binding=binding, last_verified=now, revoked=False
        )
        # Never un-revoked: a revoked console session stays revoked.
        stmt = stmt.on_conflict_do_update(
            index_elements=[vb.c.user_key, vb.c.binding],
            set_={"last_verified": stmt.excluded.last_verified},
        )
        async with self._db.transaction(write=True, operation="mfa.record_binding") as conn:
            await conn.execute(stmt)
            await conn.execute(
                delete(vb).where(
                    vb.c.user_key == user_id,
                    vb.c.last_verified < now - timedelta(days=BINDING_DAYS),
                )
            )

    async def binding_revoked(self, user_id: str, binding: str) -> bool:
        async with self._db.transaction(write=False, operation="mfa.binding_revoked") as conn:
            return await self._revoked(conn, user_id, binding)

    # --- TOTP ------------------------------------------------------------------------------

    async def begin_totp(
        self, user_id: str, secret: str, *, session_id: str, now: datetime
    ) -> None:
        pending = schema.pending_totp
        stmt = self._db.insert(pending).values(
            user_key=user_id,
            secret_encrypted=self._db.encrypt(secret),
            session_id=session_id,
            created_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[pending.c.user_key],
            set_={
                "secret_encrypted": stmt.excluded.secret_encrypted,
                "session_id": stmt.excluded.session_id,
                "created_at": stmt.excluded.created_at,
            },
        )
        async with self._db.transaction(write=True, operation="mfa.begin_totp") as conn:
            await conn.execute(stmt)

    async def pending_totp(self, user_id: str) -> PendingTotp | None:
        pending = schema.pending_totp
        async with self._db.transaction(write=False, operation="mfa.pending_totp") as conn:
            row = (
                await conn.execute(select(pending).where(pending.c.user_key == user_id))
            ).one_or_none()
        if row is None:
            return None
        return PendingTotp(self._db.decrypt(row.secret_encrypted), row.session_id, row.created_at)

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
        pending, totp = schema.pending_totp, schema.totp
        async with self._db.transaction(write=True, operation="mfa.confirm_totp") as conn:
            generation = await self._holds(conn, user_id, expected_generation, binding)
            if generation is None:
                return None
            row = (
                await conn.execute(select(pending).where(pending.c.user_key == user_id))
            ).one_or_none()
            if (
                row is None
                or row.session_id != session_id
                or row.created_at <= issued_after
                or not hmac.compare_digest(
                    self._db.decrypt(row.secret_encrypted).encode(), secret.encode()
                )
            ):
                return None
            exists = (
                await conn.execute(select(totp.c.user_key).where(totp.c.user_key == user_id))
            ).first()
            if exists is not None:
                return None
            await conn.execute(
                totp.insert().values(
                    user_key=user_id,
                    secret_encrypted=row.secret_encrypted,
                    last_step=step,
                    created_at=now,
                    last_used_at=now,
                )
            )
            await self._discard_pending(conn, user_id)
        return generation

    async def totp(self, user_id: str) -> TotpRecord | None:
        totp = schema.totp
        async with self._db.transaction(write=False, operation="mfa.totp") as conn:
            row = (
                (await conn.execute(select(totp).where(totp.c.user_key == user_id)))
                .mappings()
                .one_or_none()
            )
        if row is None:
            return None
        return TotpRecord(
            secret=self._db.decrypt(row["secret_encrypted"]),
            last_step=row["last_step"],
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
        )

    async def accept_totp_step(self, user_id: str, step: int, now: datetime) -> int | None:
        totp = schema.totp
        stmt = (
            update(totp)
            .where(
                totp.c.user_key == user_id,
                or_(totp.c.last_step.is_(None), totp.c.last_step < step),
            )
            .values(last_step=step, last_used_at=now)
        )
        async with self._db.transaction(write=True, operation="mfa.accept_totp_step") as conn:
            if (await conn.execute(stmt)).rowcount != 1:
                return None
            return await self._generation(conn, user_id)

    async def remove_totp(self, user_id: str, *, expected_generation: int) -> int | None:
        async with self._db.transaction(write=True, operation="mfa.remove_totp") as conn:
            if await self._holds(conn, user_id, expected_generation) is None:
                return None
            totp = schema.totp
            if (await conn.execute(delete(totp).where(totp.c.user_key == user_id))).rowcount == 0:
                return None
            await self._discard_pending(conn, user_id)
            return await self._bump(conn, user_id)

    # --- passkeys --------------------------------------------------------------------------

    async def add_passkey(
        self, record: PasskeyRecord, *, expected_generation: int | None, binding: str | None = None
    ) -> int | None:
        passkeys = schema.passkeys
        async with self._db.transaction(write=True, operation="mfa.add_passkey") as conn:
            generation = await self._holds(conn, record.user_id, expected_generation, binding)
            if generation is None:
                return None
            stmt = (
                self._db.insert(passkeys)
                .values(
                    credential_id=record.credential_id,
                    user_key=record.user_id,
                    public_key=record.public_key,
                    sign_count=record.sign_count,
                    transports=json_list(record.transports),
                    aaguid=record.aaguid,
                    backup_eligible=record.backup_eligible,
                    backup_state=record.backup_state,
                    name=record.name,
                    created_at=record.created_at,
                    last_used_at=record.last_used_at,
                )
                .on_conflict_do_nothing(index_elements=[passkeys.c.credential_id])
            )
            if (await conn.execute(stmt)).rowcount != 1:
                # Never overwrite: credential ids are public, and replacing the public key of
                # someone else's credential would hand their sign-in to the registrant.
                raise ValueError("this passkey is already registered")
            await self._discard_pending(conn, record.user_id)
        return generation

    async def passkeys(self, user_id: str) -> list[PasskeyRecord]:
        passkeys = schema.passkeys
        query = (
            select(passkeys)
            .where(passkeys.c.user_key == user_id)
            .order_by(passkeys.c.created_at, passkeys.c.credential_id)
        )
        async with self._db.transaction(write=False, operation="mfa.passkeys") as conn:
            return [_passkey(row) for row in (await conn.execute(query)).mappings()]

    async def passkey(self, credential_id: bytes) -> PasskeyRecord | None:
        passkeys = schema.passkeys
        query = select(passkeys).where(passkeys.c.credential_id == credential_id)
        async with self._db.transaction(write=False, operation="mfa.passkey") as conn:
            row = (await conn.execute(query)).mappings().one_or_none()
        return None if row is None else _passkey(row)

    async def record_passkey_use(
        self,
        credential_id: bytes,
        *,
        old_sign_count: int,
        new_sign_count: int,
        backup_state: bool,
        now: datetime,
    ) -> int | None:
        passkeys = schema.passkeys
        stmt = (
            update(passkeys)
            .where(
                passkeys.c.credential_id == credential_id,
                passkeys.c.sign_count == old_sign_count,
            )
            .values(sign_count=new_sign_count, backup_state=backup_state, last_used_at=now)
            .returning(passkeys.c.user_key)
        )
        async with self._db.transaction(write=True, operation="mfa.record_passkey_use") as conn:
            owner: str | None = (await conn.execute(stmt)).scalar_one_or_none()
            if owner is None:
                return None
            return await self._generation(conn, owner)

    async def remove_passkey(
        self, user_id: str, credential_id: bytes, *, expected_generation: int
    ) -> int | None:
        passkeys = schema.passkeys
        stmt = delete(passkeys).where(
            passkeys.c.user_key == user_id, passkeys.c.credential_id == credential_id
        )
        async with self._db.transaction(write=True, operation="mfa.remove_passkey") as conn:
            if await self._holds(conn, user_id, expected_generation) is None:
                return None
            if (await conn.execute(stmt)).rowcount != 1:
                return None
            await self._discard_pending(conn, user_id)
            return await self._bump(conn, user_id)

    async def rename_passkey(self, user_id: str, credential_id: bytes, name: str) -> bool:
        passkeys = schema.passkeys
        stmt = (
            update(passkeys)
            .where(passkeys.c.user_key == user_id, passkeys.c.credential_id == credential_id)
            .values(name=name)
        )
        async with self._db.transaction(write=True, operation="mfa.rename_passkey") as conn:
            return (await conn.execute(stmt)).rowcount == 1

    # --- recovery codes --------------------------------------------------------------------

    async def replace_recovery_codes(
        self, user_id: str, code_hashes: list[bytes], *, expected_generation: int, now: datetime
    ) -> bool:
        codes = schema.recovery_codes
        unique = list(dict.fromkeys(code_hashes))
        async with self._db.transaction(write=True, operation="mfa.replace_recovery_codes") as conn:
            # Under the user's lock: two concurrent regenerations never leave both sets valid.
            if await self._holds(conn, user_id, expected_generation) is None:
                return False
            await conn.execute(delete(codes).where(codes.c.user_key == user_id))
            if unique:
                await conn.execute(
                    codes.insert(),
                    [
                        {"user_key": user_id, "code_hash": h, "created_at": now, "used_at": None}
                        for h in unique
                    ],
                )
        return True

    async def use_recovery_code(self, user_id: str, code_hash: bytes, now: datetime) -> int | None:
        codes = schema.recovery_codes
        stmt = (
            update(codes)
            .where(
                codes.c.user_key == user_id,
                codes.c.code_hash == code_hash,
                codes.c.used_at.is_(None),
            )
            .values(used_at=now)
        )
        async with self._db.transaction(write=True, operation="mfa.use_recovery_code") as conn:
            if (await conn.execute(stmt)).rowcount != 1:
                return None
            return await self._generation(conn, user_id)

    async def recovery_codes_left(self, user_id: str) -> int:
        codes = schema.recovery_codes
        query = (
            select(func.count())
            .select_from(codes)
            .where(codes.c.user_key == user_id, codes.c.used_at.is_(None))
        )
        async with self._db.transaction(write=False, operation="mfa.recovery_codes_left") as conn:
            return int((await conn.execute(query)).scalar_one())

    # --- WebAuthn --------------------------------------------------------------------------

    async def user_handle(self, user_id: str) -> bytes:
        mfa = schema.user_mfa
        query = select(mfa.c.webauthn_handle).where(mfa.c.user_key == user_id)
        async with self._db.transaction(write=False, operation="mfa.user_handle") as conn:
            handle: bytes | None = (await conn.execute(query)).scalar_one_or_none()
        if handle is not None:
            return bytes(handle)
        # Set-if-absent in one statement: concurrent first calls all return the one handle
        # that was written first (the row lock orders them).
        stmt = self._db.insert(mfa).values(
            user_key=user_id, mfa_generation=0, webauthn_handle=secrets.token_bytes(_HANDLE_BYTES)
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[mfa.c.user_key],
            set_={
                "webauthn_handle": func.coalesce(
                    mfa.c.webauthn_handle, stmt.excluded.webauthn_handle
                )
            },
        ).returning(mfa.c.webauthn_handle)
        async with self._db.transaction(write=True, operation="mfa.user_handle") as conn:
            created: bytes = (await conn.execute(upsert)).scalar_one()
        return bytes(created)

    async def user_for_handle(self, handle: bytes) -> str | None:
        mfa = schema.user_mfa
        async with self._db.transaction(write=False, operation="mfa.user_for_handle") as conn:
            found: str | None = (
                await conn.execute(select(mfa.c.user_key).where(mfa.c.webauthn_handle == handle))
            ).scalar_one_or_none()
        return found

    async def put_challenge(
        self,
        challenge_id: str,
        *,
        user_id: str,
        session_id: str,
        purpose: str,
        challenge: bytes,
        expires_at: datetime,
    ) -> None:
        ch = schema.challenges
        async with self._db.transaction(write=True, operation="mfa.put_challenge") as conn:
            await conn.execute(
                ch.insert().values(
                    id=challenge_id,
                    user_key=user_id,
                    session_id=session_id,
                    purpose=purpose,
                    challenge=challenge,
                    expires_at=expires_at,
                )
            )
            # A member looping "begin" must not grow the table: only the newest few of a
            # user's ceremonies stay open (older ones are void, as if they had expired).
            newest = (
                select(ch.c.id)
                .where(ch.c.user_key == user_id)
                .order_by(ch.c.expires_at.desc(), ch.c.id)
                .limit(MAX_OPEN_CHALLENGES)
            )
            await conn.execute(delete(ch).where(ch.c.user_key == user_id, ch.c.id.not_in(newest)))

    async def take_challenge(
        self, challenge_id: str, *, user_id: str, session_id: str, purpose: str, now: datetime
    ) -> bytes | None:
        ch = schema.challenges
        # Housekeeping first, in its own transaction, so that a failure here cannot lose a
        # challenge already taken below.
        async with self._db.transaction(write=True, operation="mfa.take_challenge") as conn:
            await conn.execute(delete(ch).where(ch.c.expires_at <= now))
        stmt = (
            delete(ch)
            .where(
                ch.c.id == challenge_id,
                ch.c.user_key == user_id,
                ch.c.session_id == session_id,
                ch.c.purpose == purpose,
                ch.c.expires_at > now,
            )
            .returning(ch.c.challenge)
        )
        async with self._db.transaction(write=True, operation="mfa.take_challenge") as conn:
            taken: bytes | None = (await conn.execute(stmt)).scalar_one_or_none()
        return None if taken is None else bytes(taken)


def _passkey(row: RowMapping) -> PasskeyRecord:
    return PasskeyRecord(
        credential_id=bytes(row["credential_id"]),
        user_id=row["user_key"],
        public_key=bytes(row["public_key"]),
        sign_count=row["sign_count"],
        transports=tuple_of_str(row["transports"]),
        aaguid=row["aaguid"],
        backup_eligible=bool(row["backup_eligible"]),
        backup_state=bool(row["backup_state"]),
        name=row["name"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )
