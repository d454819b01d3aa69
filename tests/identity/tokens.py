"""Signed tokens for the jwt source's tests: keys, claims, forgeries, where tokens go."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
HMAC_SECRET = "s" * 32
AUDIENCE = "console"
ISSUER = "https://idp.example"


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "u-alice",
        "email": "alice@example.com",
        "role": "member",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def rs256(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), RSA_KEY, algorithm="RS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_hs256(secret: bytes, **overrides: Any) -> str:
    """An HS256 token using ``secret`` as the HMAC key (PyJWT refuses to make this one)."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(**overrides)).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def unsigned(**overrides: Any) -> str:
    """An ``alg: none`` token (RFC 7519 §6): no signature at all."""
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims(**overrides)).encode())}."


def jwt_section(**overrides: Any) -> dict[str, Any]:
    """``identity.jwt`` verifying :func:`rs256` tokens, read from the ``id_token`` cookie and
    the Authorization header."""
    return {
        "key": public_pem(RSA_KEY),
        "audience": AUDIENCE,
        "issuer": ISSUER,
        "cookie": "id_token",
        **overrides,
    }


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def cookie(token: str) -> tuple[str, str]:
    return ("Cookie", f"theme=dark; id_token={token}")
