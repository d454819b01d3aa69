"""A software WebAuthn authenticator for API tests: ES256 (EC P-256), "none" attestation.

It answers the options JSON the sidecar sends (``PublicKeyCredentialCreationOptionsJSON`` and
``PublicKeyCredentialRequestOptionsJSON``) with the JSON a browser's ``credential.toJSON()``
gives, so tests can drive the passkey API end to end without a browser. Keyword overrides
make it misbehave the ways a test needs: another origin, another RP ID hash, no user
verification, a chosen signature counter, another user handle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

UP, UV, BE, BS, AT = 0x01, 0x04, 0x08, 0x10, 0x40


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def from_b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(slots=True)
class SoftCredential:
    credential_id: bytes
    private_key: ec.EllipticCurvePrivateKey
    user_handle: bytes
    rp_id: str
    sign_count: int = 0


class SoftAuthenticator:
    """One authenticator holding any number of credentials (discoverable: it keeps the user
    handle). ``sign_count_step=0`` imitates authenticators that never count."""

    def __init__(
        self,
        rp_id: str,
        origin: str,
        *,
        user_verified: bool = True,
        sign_count_step: int = 1,
        aaguid: bytes = bytes(16),
        backup_eligible: bool = False,
    ) -> None:
        self.rp_id = rp_id
        self.origin = origin
        self.user_verified = user_verified
        self.sign_count_step = sign_count_step
        self.aaguid = aaguid
        self.backup_eligible = backup_eligible
        self.credentials: list[SoftCredential] = []

    def _flags(self, *, user_verified: bool | None, attested: bool) -> int:
        flags = UP
        if self.user_verified if user_verified is None else user_verified:
            flags |= UV
        if self.backup_eligible:
            flags |= BE | BS
        if attested:
            flags |= AT
        return flags

    def _client_data(self, kind: str, challenge: str, origin: str | None) -> bytes:
        data = {"type": kind, "challenge": challenge, "origin": origin or self.origin}
        return json.dumps(data, separators=(",", ":")).encode()

    def create(
        self,
        options_json: dict[str, Any],
        *,
        origin: str | None = None,
        rp_id: str | None = None,
        user_verified: bool | None = None,
        credential_id: bytes | None = None,
    ) -> dict[str, Any]:
        """A new credential for ``options_json`` (``RegistrationResponseJSON``); a chosen
        ``credential_id`` imitates an attacker re-using someone else's (public) id."""
        key = ec.generate_private_key(ec.SECP256R1())
        numbers = key.public_key().public_numbers()
        cose_key = {1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32), -3: numbers.y.to_bytes(32)}
        credential = SoftCredential(
            credential_id=credential_id or secrets.token_bytes(32),
            private_key=key,
            user_handle=from_b64url(options_json["user"]["id"]),
            rp_id=options_json["rp"]["id"],
        )
        self.credentials.append(credential)
        auth_data = (
            hashlib.sha256((rp_id or credential.rp_id).encode()).digest()
            + bytes([self._flags(user_verified=user_verified, attested=True)])
            + struct.pack(">I", credential.sign_count)
            + self.aaguid
            + struct.pack(">H", len(credential.credential_id))
            + credential.credential_id
            + cbor2.dumps(cose_key)
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        client_data = self._client_data("webauthn.create", options_json["challenge"], origin)
        return {
            "id": b64url(credential.credential_id),
            "rawId": b64url(credential.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
                "transports": ["internal"],
            },
            "clientExtensionResults": {},
            "authenticatorAttachment": "platform",
        }

    def _pick(self, options_json: dict[str, Any], credential_id: bytes | None) -> SoftCredential:
        if credential_id is None:
            allowed = [from_b64url(d["id"]) for d in options_json.get("allowCredentials", [])]
            candidates = [c for c in self.credentials if not allowed or c.credential_id in allowed]
        else:
            candidates = [c for c in self.credentials if c.credential_id == credential_id]
        if not candidates:
            raise LookupError("no credential of this authenticator fits the request")
        return candidates[0]

    def get(
        self,
        options_json: dict[str, Any],
        *,
        credential_id: bytes | None = None,
        sign_count: int | None = None,
        origin: str | None = None,
        rp_id: str | None = None,
        user_verified: bool | None = None,
        user_handle: bytes | None = None,
    ) -> dict[str, Any]:
        """An assertion for ``options_json`` (``AuthenticationResponseJSON``), signed by the
        given credential or the first one ``allowCredentials`` names."""
        credential = self._pick(options_json, credential_id)
        if sign_count is None:
            credential.sign_count += self.sign_count_step
        else:
            credential.sign_count = sign_count
        auth_data = (
            hashlib.sha256(
                (rp_id or options_json.get("rpId") or credential.rp_id).encode()
            ).digest()
            + bytes([self._flags(user_verified=user_verified, attested=False)])
            + struct.pack(">I", credential.sign_count)
        )
        client_data = self._client_data("webauthn.get", options_json["challenge"], origin)
        signature = credential.private_key.sign(
            auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        return {
            "id": b64url(credential.credential_id),
            "rawId": b64url(credential.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(
                    credential.user_handle if user_handle is None else user_handle
                ),
            },
            "clientExtensionResults": {},
            "authenticatorAttachment": "platform",
        }
