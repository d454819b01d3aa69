"""Identity from a signed token (JWT) in a cookie or a header, verified with PyJWT.

Where the token comes from: the cookie ``identity.jwt.cookie`` (when configured) and the
header ``identity.jwt.header`` (default ``Authorization``, ``Bearer`` scheme). Every token
present is verified; the identity comes from the valid one, the cookie's when both are valid.

What is verified: the signature with the configured key and algorithms only, ``exp``
(required) and ``nbf``/``iat`` with 30 s leeway, ``aud`` and ``iss`` when configured (a token
that carries ``aud`` is refused when no audience is configured, PyJWT's default).

Answers:

* no token: anonymous;
* a refused token: anonymous when it is expired, not signed with the configured key or not a
  JWT at all; :class:`IdentityUnavailable` for any other reason (signed with the key but
  refused by the sidecar's checks, which the console may not share). Every refusal is
  counted by reason; see :mod:`sidecar.identity.refusals` for the reasons and why;
* valid tokens naming different users, or more than :data:`MAX_TOKENS` tokens:
  :class:`IdentityUnavailable`. The console may pick a different one than we would, and an
  "anonymous" answer would let the request skip the MFA gate;
* a valid token without a usable ``id_claim``: :class:`IdentityUnavailable` (the claim name
  is misconfigured; logged once).

Browser session or API client: a request is ``bearer_only`` when its identity comes from
the header and it carries no cookie token at all (a valid, expired or broken cookie token
makes it a browser's request, whatever the header says). It is an ``api_token`` only when,
besides, ``identity.jwt.api_token`` is set and the token's ``claim`` is its ``value`` (or a
list holding it): the browser's own session token sent as ``Authorization: Bearer`` is
bearer-only but, without that claim, meets the MFA gate. A token in the cookie is never an
API token, whatever its claims.

Keys are checked when the provider is built (:class:`~sidecar.config.ConfigError` naming the
YAML path): ``none`` is never accepted, and HMAC algorithms never share a list with a public
key. With ``HS256`` allowed and a public key configured, anyone could sign tokens using the
public key as the HMAC secret (algorithm confusion, RFC 8725 §2.1, CVE-2022-29217).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import AllowedPublicKeys, HMACAlgorithm
from multidict import CIMultiDictProxy

from sidecar.config import Config, ConfigError
from sidecar.config import Jwt as JwtSettings
from sidecar.identity.base import (
    Identity,
    IdentityUnavailable,
    bearer_token,
    choose_role,
    cookie_pairs,
    credential_hash,
    lookup_field,
    marks_api_token,
    string_or_none,
    user_id_from,
)
from sidecar.identity.refusals import TokenRefusal, TokenRefusals
from sidecar.logs import fields
from sidecar.net.forwarding import Forwarding

log = logging.getLogger("sidecar.identity.jwt")

LEEWAY_SECONDS: Final = 30
# Real clients send one token; a pile of them only costs signature checks.
MAX_TOKENS: Final = 4

VerificationKey = AllowedPublicKeys | bytes
_VERIFYING_KEY_TYPES: Final = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)

# PyJWT's errors that name the reason; subclasses before their bases (InvalidSignatureError
# is a DecodeError). Any other error is a token that does not parse: see _reason.
_REASONS: Final = (
    (jwt.ExpiredSignatureError, TokenRefusal.EXPIRED),
    (jwt.ImmatureSignatureError, TokenRefusal.NOT_YET_VALID),
    (jwt.InvalidAlgorithmError, TokenRefusal.ALGORITHM_NOT_ALLOWED),
    (jwt.InvalidSignatureError, TokenRefusal.BAD_SIGNATURE),
    (jwt.InvalidAudienceError, TokenRefusal.WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, TokenRefusal.WRONG_ISSUER),
    (jwt.MissingRequiredClaimError, TokenRefusal.MISSING_CLAIM),
)

# What to check when a reason that fails closed shows up (logged once per reason).
_HINTS: Final = {
    TokenRefusal.NOT_YET_VALID: "its nbf or iat is over 30 s ahead: check the clocks of the "
    "sidecar and the token issuer",
    TokenRefusal.MISSING_CLAIM: "exp is required, and aud when identity.jwt.audience is set",
    TokenRefusal.WRONG_AUDIENCE: "check identity.jwt.audience (a token carrying aud needs it)",
    TokenRefusal.WRONG_ISSUER: "check identity.jwt.issuer",
    TokenRefusal.ALGORITHM_NOT_ALLOWED: "its alg is none of identity.jwt.algorithms that fit "
    "the key",
    TokenRefusal.INVALID_CLAIMS: "signed with the configured key, but its claims do not parse "
    "(exp, nbf and iat must be numbers, sub a string)",
    TokenRefusal.NO_USER_ID: "check identity.jwt.id_claim",
}


class JwtProvider:
    """Verifies tokens from a cookie or a header; see the module docstring."""

    def __init__(
        self,
        *,
        settings: JwtSettings,
        key: VerificationKey,
        algorithms: Sequence[str],
        admin_roles: Sequence[str],
        refusals: TokenRefusals | None = None,
    ) -> None:
        self._settings = settings
        self._key = key
        self._algorithms = list(algorithms)
        self._admin_roles = tuple(admin_roles)
        self._refusals = refusals
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, config: Config, *, refusals: TokenRefusals | None = None) -> JwtProvider:
        """Reads and checks the key once; raises ConfigError when it cannot be used."""
        settings = config.identity.jwt
        key, algorithms = load_verification_key(settings)
        return cls(
            settings=settings,
            key=key,
            algorithms=algorithms,
            admin_roles=config.identity.admin_roles,
            refusals=refusals,
        )

    @property
    def algorithms(self) -> list[str]:
        """The algorithms accepted: the configured ones that fit the key."""
        return list(self._algorithms)

    async def identify(
        self, headers: CIMultiDictProxy[str], peer_trusted: bool, forwarding: Forwarding
    ) -> Identity | None:
        del peer_trusted, forwarding  # a signature is worth the same from any peer, any host
        candidates = self._tokens(headers)
        if len(candidates) > MAX_TOKENS:
            raise IdentityUnavailable(f"request carries {len(candidates)} tokens")
        # Any cookie token, valid or not, makes it a browser's request.
        browser = any(not from_header for _, from_header in candidates)
        found: list[Identity] = []
        for token, from_header in candidates:
            identity = self._verify(token, bearer_only=from_header and not browser)
            if identity is not None:
                found.append(identity)
        if not found:
            return None
        if len({identity.user_id for identity in found}) > 1:
            raise IdentityUnavailable("request carries valid tokens for different users")
        return found[0]  # cookie tokens come first

    async def close(self) -> None:
        return None

    def _tokens(self, headers: CIMultiDictProxy[str]) -> list[tuple[str, bool]]:
        """(token, came from the header) pairs: cookie tokens first, then header tokens."""
        settings = self._settings
        tokens: list[tuple[str, bool]] = []
        if settings.cookie:
            for line in headers.getall("Cookie", ()):
                for name, value in cookie_pairs(line):
                    if name == settings.cookie and (cookie_token := _unquote(value)):
                        tokens.append((cookie_token, False))
        for line in headers.getall(settings.header, ()):
            token = bearer_token(line)
            if token is None and settings.header.lower() != "authorization":
                token = line.strip() or None  # a dedicated header may carry the bare token
            if token is not None:
                tokens.append((token, True))
        return tokens

    def _verify(self, token: str, *, bearer_only: bool) -> Identity | None:
        """The token's identity; None when it counts as anonymous. Raises
        IdentityUnavailable when it is refused for a reason that fails closed."""
        settings = self._settings
        claims = self._claims(token)
        if claims is None:
            return None
        user_id = user_id_from(lookup_field(claims, settings.id_claim))
        if user_id is None:
            self._refused(TokenRefusal.NO_USER_ID, id_claim=settings.id_claim)
            raise IdentityUnavailable(f"token has no usable {settings.id_claim!r} claim")
        rule = settings.api_token
        return Identity(
            user_id=user_id,
            email=string_or_none(lookup_field(claims, settings.email_claim)),
            role=choose_role(lookup_field(claims, settings.role_claim), self._admin_roles),
            bearer_only=bearer_only,
            api_token=bearer_only
            and rule is not None
            and marks_api_token(lookup_field(claims, rule.claim), rule.value),
            credential_hash=credential_hash([token]),
        )

    def _claims(self, token: str) -> dict[str, object] | None:
        settings = self._settings
        try:
            claims: dict[str, object] = jwt.decode(
                token,
                key=self._key,
                algorithms=self._algorithms,
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp"], "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            reason = self._reason(token, exc)
            details = {"claim": exc.claim} if isinstance(exc, jwt.MissingRequiredClaimError) else {}
            self._refused(reason, **details)
            if reason.fails_closed:
                raise IdentityUnavailable(f"token refused ({reason})") from None
            return None
        return claims

    def _reason(self, token: str, exc: jwt.PyJWTError) -> TokenRefusal:
        for kind, reason in _REASONS:
            if isinstance(exc, kind):
                return reason
        # A token that does not parse: before its signature was checked (segments, base64,
        # header), or after (a payload that is not an object, an exp that is not a number).
        # Only the signature tells whether the issuer made it; checked here, off the hot path.
        return (
            TokenRefusal.INVALID_CLAIMS if self._signed_with_key(token) else TokenRefusal.MALFORMED
        )

    def _signed_with_key(self, token: str) -> bool:
        try:
            jwt.api_jws.decode_complete(
                token,
                key=self._key,
                algorithms=self._algorithms,
                options={"enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError:
            return False
        return True

    def _refused(self, reason: TokenRefusal, **details: object) -> None:
        if self._refusals is not None:
            self._refusals.count(reason)
        if not reason.fails_closed:
            log.debug("token refused, request is anonymous", extra=fields(reason=reason.value))
            return
        message = f"token refused, answering 503 ({reason}): {_HINTS[reason]}"
        if reason.value in self._warned:
            log.debug(message, extra=fields(reason=reason.value, **details))
            return
        self._warned.add(reason.value)
        log.warning(message + " (logged once)", extra=fields(reason=reason.value, **details))


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


# --- key loading -----------------------------------------------------------------------------


def load_verification_key(settings: JwtSettings) -> tuple[VerificationKey, list[str]]:
    """The key to verify with and the configured algorithms that fit it.

    Raises ConfigError when: no key or both ``key`` and ``key_file``; the file cannot be
    read; an algorithm is ``none`` or unknown; HMAC algorithms are mixed with a public key, or
    asymmetric ones with a shared secret; the key is too short (RFC 7518 §3.2 for HMAC, 2048
    bits for RSA); no configured algorithm fits the key. A private key is accepted and only
    its public half kept (the sidecar never signs).
    """
    path, raw = _read_key(settings)
    problems: list[str] = []
    hmac_names: list[str] = []
    other_names: list[str] = []
    if not settings.algorithms:
        problems.append("identity.jwt.algorithms: must name at least one algorithm")
    for i, name in enumerate(settings.algorithms):
        if name.strip().lower() == "none":
            problems.append(
                f"identity.jwt.algorithms[{i}]: 'none' is never accepted (unsigned tokens)"
            )
            continue
        try:
            algorithm = jwt.get_algorithm_by_name(name)
        except NotImplementedError:
            problems.append(f"identity.jwt.algorithms[{i}]: {name!r} is not a JWT algorithm")
            continue
        (hmac_names if isinstance(algorithm, HMACAlgorithm) else other_names).append(name)
    if problems:
        raise ConfigError(problems)

    if _looks_asymmetric(raw):
        if hmac_names:
            raise ConfigError(
                [
                    f"identity.jwt.algorithms: {', '.join(hmac_names)} cannot be used with a "
                    f"public key in {path} (anyone could sign tokens with the public key as the "
                    "HMAC secret; RFC 8725 §2.1)"
                ]
            )
        return _asymmetric(path, raw, other_names)
    if other_names:
        raise ConfigError(
            [
                f"identity.jwt.algorithms: {', '.join(other_names)} need a public key (PEM) in "
                f"{path}, which holds a shared secret"
            ]
        )
    return _hmac(path, raw, hmac_names), hmac_names


def _read_key(settings: JwtSettings) -> tuple[str, bytes]:
    if settings.key and settings.key_file:
        raise ConfigError(["identity.jwt: set key or key_file, not both"])
    if settings.key_file is not None:
        path = "identity.jwt.key_file"
        try:
            raw = Path(settings.key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(
                [f"{path}: cannot read {str(settings.key_file)!r}: {exc.strerror}"]
            ) from None
    elif settings.key:
        path, raw = "identity.jwt.key", settings.key.encode()
    else:
        raise ConfigError(["identity.jwt: neither key nor key_file is set"])
    if not raw.strip():
        raise ConfigError([f"{path}: the key is empty"])
    return path, raw


def _looks_asymmetric(raw: bytes) -> bool:
    text = raw.strip()
    return text.startswith((b"-----BEGIN", b"ssh-", b"ecdsa-sha2-"))


def _hmac(path: str, raw: bytes, names: list[str]) -> bytes:
    # The secret is used as written: a trailing newline from a key file is part of what the
    # file says, but almost never what the issuer signs with.
    secret = raw.rstrip(b"\r\n")
    for name in names:
        algorithm = jwt.get_algorithm_by_name(name)
        try:
            prepared = algorithm.prepare_key(secret)
        except jwt.InvalidKeyError as exc:
            raise ConfigError([f"{path}: {exc}"]) from None
        if (problem := algorithm.check_key_length(prepared)) is not None:
            raise ConfigError([f"{path}: {problem}"])
    return secret


def _asymmetric(path: str, raw: bytes, names: list[str]) -> tuple[AllowedPublicKeys, list[str]]:
    try:
        key = _public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            [f"{path}: not a usable PEM public key, private key or certificate ({exc})"]
        ) from None
    fitting: list[str] = []
    for name in names:
        algorithm = jwt.get_algorithm_by_name(name)
        try:
            prepared = algorithm.prepare_key(key)
        except (jwt.InvalidKeyError, TypeError, ValueError):
            continue  # e.g. ES256 next to RS256 (the default list) with an RSA key
        if (problem := algorithm.check_key_length(prepared)) is not None:
            raise ConfigError([f"{path}: {problem}"])
        fitting.append(name)
    if not fitting:
        kind = type(key).__name__.lstrip("_")
        raise ConfigError(
            [f"identity.jwt.algorithms: none of {', '.join(names)} fits the {kind} in {path}"]
        )
    return key, fitting


def _public_key(raw: bytes) -> AllowedPublicKeys:
    text = raw.strip()
    if text.startswith((b"ssh-", b"ecdsa-sha2-")):
        key: object = serialization.load_ssh_public_key(text)
    elif b"-----BEGIN CERTIFICATE-----" in text:
        key = x509.load_pem_x509_certificate(text).public_key()
    elif b"PRIVATE KEY-----" in text:
        private = serialization.load_pem_private_key(text, password=None)
        key = private.public_key()
        log.warning(
            "identity.jwt holds a private key; only its public half is used. "
            "Configure the public key: the sidecar never signs tokens"
        )
    else:
        key = serialization.load_pem_public_key(text)
    if not isinstance(key, _VERIFYING_KEY_TYPES):
        raise ValueError(f"{type(key).__name__.lstrip('_')} cannot verify JWTs")
    return key
