"""Passkeys (WebAuthn) via py_webauthn: registration and authentication ceremonies.

Promises:

- User verification is required (Face ID, Touch ID, Windows Hello, a PIN on a security user_id);
  discoverable credentials are preferred; platform and roaming authenticators both work (no
  attachment restriction); ``rp_id`` and the allowed origins come from config.
- Challenges live in the store, bound to the user, the sidecar session and the purpose,
  single use (taken atomically) and expiring with the ceremony timeout. The challenge id is
  kept in the session cookie; the challenge itself never leaves the server except in the
  options.
- The credential presented for verification must belong to the user being verified (the
  library does not check this), and its user handle, when sent, must be that user's.
- Sign counts: a counter that does not move forward is refused (authenticators that always
  report 0 are fine); the stored count moves with a conditional update, so a cloned
  authenticator racing the original cannot both succeed.
- The WebAuthn user handle is a stable random value per user, never the user id or email.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    base64url_to_bytes,
    parse_authentication_credential_json,
    parse_registration_credential_json,
)
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from sidecar.config import Config
from sidecar.store.base import PasskeyRecord, Store

CEREMONY_SECONDS = 120
#: WebAuthn Level 3 §7.1 step 24: relying parties should refuse longer credential ids.
MAX_CREDENTIAL_ID = 1023
REGISTER = "passkey.register"
AUTHENTICATE = "passkey.authenticate"
_KNOWN_TRANSPORTS = {t.value for t in AuthenticatorTransport}


class PasskeyError(Exception):
    """A ceremony failed; the message is safe to show to the user."""


@dataclass(frozen=True, slots=True)
class Begun:
    challenge_id: str  # to keep in the session
    options_json: str  # for PublicKeyCredential.parse*OptionsFromJSON


def _descriptor(record: PasskeyRecord) -> PublicKeyCredentialDescriptor:
    return PublicKeyCredentialDescriptor(
        id=record.credential_id,
        transports=[AuthenticatorTransport(t) for t in record.transports if t in _KNOWN_TRANSPORTS],
    )


class Passkeys:
    def __init__(self, *, store: Store, config: Config) -> None:
        self._store = store
        self._rp_id = config.mfa.rp_id
        self._rp_name = config.mfa.rp_name
        self._origins = list(config.mfa.origin)

    async def _remember(
        self, challenge: bytes, *, user_id: str, session_id: str, purpose: str, now: datetime
    ) -> str:
        challenge_id = secrets.token_urlsafe(18)
        await self._store.mfa.put_challenge(
            challenge_id,
            user_id=user_id,
            session_id=session_id,
            purpose=purpose,
            challenge=challenge,
            expires_at=now + timedelta(seconds=CEREMONY_SECONDS),
        )
        return challenge_id

    async def _take(
        self,
        challenge_id: object,
        *,
        user_id: str,
        session_id: str,
        purpose: str,
        now: datetime,
    ) -> bytes:
        if not isinstance(challenge_id, str):
            raise PasskeyError("No passkey request is in progress. Start again.")
        challenge = await self._store.mfa.take_challenge(
            challenge_id,
            user_id=user_id,
            session_id=session_id,
            purpose=purpose,
            now=now,
        )
        if challenge is None:
            raise PasskeyError("This passkey request expired or was already used. Start again.")
        return challenge

    async def begin_registration(
        self, *, user_id: str, user_name: str, display_name: str, session_id: str, now: datetime
    ) -> Begun:
        handle = await self._store.mfa.user_handle(user_id)
        existing = await self._store.mfa.passkeys(user_id)
        options = generate_registration_options(
            rp_id=self._rp_id,
            rp_name=self._rp_name,
            user_name=user_name,
            user_id=handle,
            user_display_name=display_name,
            timeout=CEREMONY_SECONDS * 1000,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED,
                user_verification=UserVerificationRequirement.REQUIRED,
            ),
            exclude_credentials=[_descriptor(r) for r in existing],
        )
        challenge_id = await self._remember(
            options.challenge, user_id=user_id, session_id=session_id, purpose=REGISTER, now=now
        )
        return Begun(challenge_id, options_to_json(options))

    async def finish_registration(
        self,
        *,
        user_id: str,
        session_id: str,
        challenge_id: object,
        credential: Any,
        name: str,
        now: datetime,
    ) -> PasskeyRecord:
        """The verified new credential, not stored yet (the caller stores it under its
        generation condition: ``MfaStore.add_passkey``)."""
        challenge = await self._take(
            challenge_id, user_id=user_id, session_id=session_id, purpose=REGISTER, now=now
        )
        try:
            parsed = parse_registration_credential_json(credential)
            verified = verify_registration_response(
                credential=parsed,
                expected_challenge=challenge,
                expected_rp_id=self._rp_id,
                expected_origin=self._origins,
                require_user_verification=True,
            )
        except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
            raise PasskeyError(f"The passkey could not be registered: {exc}") from exc
        if len(verified.credential_id) > MAX_CREDENTIAL_ID:
            raise PasskeyError("The passkey's credential id is too long.")
        if await self._store.mfa.passkey(verified.credential_id) is not None:
            raise PasskeyError("This passkey is already registered.")
        transports = tuple(t.value for t in (parsed.response.transports or ()))
        record = PasskeyRecord(
            credential_id=verified.credential_id,
            user_id=user_id,
            public_key=verified.credential_public_key,
            sign_count=verified.sign_count,
            transports=transports,
            aaguid=verified.aaguid,
            backup_eligible=verified.credential_device_type is CredentialDeviceType.MULTI_DEVICE,
            backup_state=verified.credential_backed_up,
            name=(name.strip() or "Passkey")[:64],
            created_at=now,
            last_used_at=None,
        )
        return record

    async def begin_authentication(self, *, user_id: str, session_id: str, now: datetime) -> Begun:
        existing = await self._store.mfa.passkeys(user_id)
        if not existing:
            raise PasskeyError("You have no passkeys yet.")
        options = generate_authentication_options(
            rp_id=self._rp_id,
            timeout=CEREMONY_SECONDS * 1000,
            allow_credentials=[_descriptor(r) for r in existing],
            user_verification=UserVerificationRequirement.REQUIRED,
        )
        challenge_id = await self._remember(
            options.challenge, user_id=user_id, session_id=session_id, purpose=AUTHENTICATE, now=now
        )
        return Begun(challenge_id, options_to_json(options))

    async def finish_authentication(
        self,
        *,
        user_id: str,
        session_id: str,
        challenge_id: object,
        credential: Any,
        now: datetime,
    ) -> int:
        """Verify an assertion; the user's generation the verification counts for."""
        challenge = await self._take(
            challenge_id, user_id=user_id, session_id=session_id, purpose=AUTHENTICATE, now=now
        )
        try:
            parsed = parse_authentication_credential_json(credential)
        except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
            raise PasskeyError("The passkey answer could not be read.") from exc
        stored = await self._store.mfa.passkey(parsed.raw_id)
        # py_webauthn checks the signature against the user_id we pass; that the user_id belongs to
        # *this* user is ours to check.
        if stored is None or stored.user_id != user_id:
            raise PasskeyError("That passkey is not registered for your account.")
        handle = parsed.response.user_handle
        if handle and handle != await self._store.mfa.user_handle(user_id):
            raise PasskeyError("That passkey belongs to another account.")
        try:
            verified = verify_authentication_response(
                credential=parsed,
                expected_challenge=challenge,
                expected_rp_id=self._rp_id,
                expected_origin=self._origins,
                credential_public_key=stored.public_key,
                credential_current_sign_count=stored.sign_count,
                require_user_verification=True,
            )
        except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
            raise PasskeyError(f"The passkey could not be verified: {exc}") from exc
        generation = await self._store.mfa.record_passkey_use(
            stored.credential_id,
            old_sign_count=stored.sign_count,
            new_sign_count=verified.new_sign_count,
            backup_state=verified.credential_backed_up,
            now=now,
        )
        if generation is None:
            raise PasskeyError("The passkey was used elsewhere at the same moment. Try again.")
        return generation


def credential_id_from(text: str) -> bytes | None:
    """A credential id as the API shows it (base64url), or None if it is not one."""
    try:
        return base64url_to_bytes(text)
    except (ValueError, TypeError):
        return None
