"""The jwt source: signed tokens from a cookie or a header, and the key checks at build."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.config import Config, ConfigError
from sidecar.identity import IdentityUnavailable, build_identity_provider
from sidecar.identity.jwt import JwtProvider
from tests.identity.stub_console import FORWARDING, headers, make_config

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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_hs256(secret: bytes, **overrides: Any) -> str:
    """An HS256 token using ``secret`` as the HMAC key (PyJWT refuses to make this one)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims(**overrides)).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def unsigned(**overrides: Any) -> str:
    """An ``alg: none`` token (RFC 7519 §6): no signature at all."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims(**overrides)).encode())}."


def rsa_config(**jwt_settings: Any) -> Config:
    settings: dict[str, Any] = {
        "key": public_pem(RSA_KEY),
        "audience": AUDIENCE,
        "issuer": ISSUER,
        "cookie": "id_token",
        **jwt_settings,
    }
    return make_config(source="jwt", jwt=settings, admin_roles=["admin", "owner"])


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def cookie(token: str) -> tuple[str, str]:
    return ("Cookie", f"theme=dark; id_token={token}")


@dataclass(frozen=True)
class Case:
    lines: Callable[[], tuple[tuple[str, str], ...]]
    expected: tuple[str, str | None, str | None, bool] | None  # user, email, role, via_token


ALICE_MEMBER = ("u-alice", "alice@example.com", "member", True)

CASES = {
    "valid bearer token": Case(lambda: (bearer(rs256()),), ALICE_MEMBER),
    "valid cookie token is a browser session": Case(
        lambda: (cookie(rs256()),), ("u-alice", "alice@example.com", "member", False)
    ),
    "cookie and header for the same user: the cookie": Case(
        lambda: (cookie(rs256()), bearer(rs256(role="admin"))),
        ("u-alice", "alice@example.com", "member", False),
    ),
    "invalid cookie does not hide a valid header token": Case(
        lambda: (cookie("junk"), bearer(rs256())), ALICE_MEMBER
    ),
    "no token": Case(lambda: (("Cookie", "theme=dark"),), None),
    "basic authorization is not a token": Case(lambda: (("Authorization", "Basic dTpw"),), None),
    "garbage": Case(lambda: (bearer("not-a-jwt"),), None),
    "expired": Case(lambda: (bearer(rs256(exp=int(time.time()) - 120)),), None),
    "expired within the 30 s leeway": Case(
        lambda: (bearer(rs256(exp=int(time.time()) - 10)),), ALICE_MEMBER
    ),
    "not yet valid": Case(lambda: (bearer(rs256(nbf=int(time.time()) + 120)),), None),
    "without exp": Case(lambda: (bearer(rs256(exp=None)),), None),
    "wrong audience": Case(lambda: (bearer(rs256(aud="other-app")),), None),
    "no audience": Case(lambda: (bearer(rs256(aud=None)),), None),
    "wrong issuer": Case(lambda: (bearer(rs256(iss="https://evil.example")),), None),
    "signed by another key": Case(
        lambda: (bearer(jwt.encode(claims(), OTHER_RSA_KEY, algorithm="RS256")),), None
    ),
    "alg none": Case(lambda: (bearer(unsigned()),), None),
    "HS256 signed with the public key": Case(
        lambda: (bearer(forged_hs256(public_pem(RSA_KEY).encode())),), None
    ),
    "role list: the first admin role": Case(
        lambda: (bearer(rs256(role=["member", "owner", "admin"])),),
        ("u-alice", "alice@example.com", "owner", True),
    ),
    "role list without admin: the first": Case(
        lambda: (bearer(rs256(role=["viewer", "member"])),),
        ("u-alice", "alice@example.com", "viewer", True),
    ),
    "no email or role claims": Case(
        lambda: (bearer(rs256(email=None, role=None)),), ("u-alice", None, None, True)
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_identity_from_token(case: Case) -> None:
    provider = build_identity_provider(rsa_config())
    identity = await provider.identify(
        headers(*case.lines()), peer_trusted=False, forwarding=FORWARDING
    )
    if case.expected is None:
        assert identity is None
    else:
        assert identity is not None
        got = (identity.user_id, identity.email, identity.role, identity.via_token)
        assert got == case.expected


async def test_custom_claims_header_and_nested_roles() -> None:
    config = rsa_config(
        cookie=None,
        header="X-Id-Token",
        id_claim="uid",
        email_claim="https://example.com/email",
        role_claim="realm_access.roles",
    )
    provider = build_identity_provider(config)
    token = rs256(
        sub="ignored",
        uid=7,
        **{"https://example.com/email": "bob@example.com"},
        realm_access={"roles": ["offline", "admin"]},
    )
    identity = await provider.identify(
        headers(("X-Id-Token", token)), peer_trusted=False, forwarding=FORWARDING
    )
    assert identity is not None
    assert (identity.user_id, identity.email, identity.role, identity.via_token) == (
        "7",
        "bob@example.com",
        "admin",
        True,
    )
    # Without a cookie configured, a cookie named like one is not read.
    assert (
        await provider.identify(headers(cookie(token)), peer_trusted=False, forwarding=FORWARDING)
        is None
    )


UNAVAILABLE = {
    "valid tokens for different users": lambda: (cookie(rs256()), bearer(rs256(sub="u-bob"))),
    "valid token without the id claim": lambda: (bearer(rs256(sub=None)),),
    "too many tokens": lambda: tuple(bearer("x") for _ in range(5)),
}


@pytest.mark.parametrize("lines", UNAVAILABLE.values(), ids=UNAVAILABLE.keys())
async def test_ambiguous_or_unusable_tokens_fail_closed(
    lines: Callable[[], tuple[tuple[str, str], ...]],
) -> None:
    provider = build_identity_provider(rsa_config())
    with pytest.raises(IdentityUnavailable):
        await provider.identify(headers(*lines()), peer_trusted=False, forwarding=FORWARDING)


async def test_credential_hash_is_per_token() -> None:
    provider = build_identity_provider(rsa_config())
    one, two = rs256(), rs256(iat=int(time.time()) - 1)
    first = await provider.identify(headers(bearer(one)), peer_trusted=False, forwarding=FORWARDING)
    again = await provider.identify(headers(cookie(one)), peer_trusted=False, forwarding=FORWARDING)
    other = await provider.identify(headers(bearer(two)), peer_trusted=False, forwarding=FORWARDING)
    assert first is not None
    assert again is not None
    assert other is not None
    assert first.credential_hash == again.credential_hash != other.credential_hash


async def test_hmac_secret_verifies_hs256() -> None:
    config = make_config(source="jwt", jwt={"key": HMAC_SECRET, "algorithms": ["HS256"]})
    provider = build_identity_provider(config)
    token = jwt.encode(claims(aud=None), HMAC_SECRET, algorithm="HS256")
    identity = await provider.identify(
        headers(bearer(token)), peer_trusted=False, forwarding=FORWARDING
    )
    assert identity is not None
    assert identity.user_id == "u-alice"


def test_default_algorithms_keep_those_that_fit_the_key() -> None:
    rsa_provider = JwtProvider.from_config(rsa_config())
    ec_provider = JwtProvider.from_config(rsa_config(key=public_pem(EC_KEY)))
    assert rsa_provider.algorithms == ["RS256"]
    assert ec_provider.algorithms == ["ES256"]


async def test_key_file_and_private_key_are_read_once(tmp_path: Path) -> None:
    key_file = tmp_path / "jwt.pem"
    key_file.write_text(private_pem(RSA_KEY))
    provider = build_identity_provider(rsa_config(key=None, key_file=str(key_file)))
    key_file.unlink()  # read at build: later changes do not matter
    identity = await provider.identify(
        headers(bearer(rs256())), peer_trusted=False, forwarding=FORWARDING
    )
    assert identity is not None


WEAK_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505

BAD_KEYS: dict[str, tuple[dict[str, Any], str]] = {
    "none algorithm": (
        {"algorithms": ["RS256", "none"]},
        "identity.jwt.algorithms[1]: 'none' is never accepted",
    ),
    "unknown algorithm": ({"algorithms": ["RS257"]}, "'RS257' is not a JWT algorithm"),
    "HS256 mixed with a public key": (
        {"algorithms": ["RS256", "HS256"]},
        "HS256 cannot be used with a public key",
    ),
    "HS256 alone with a public key": ({"algorithms": ["HS256"]}, "cannot be used with a public"),
    "RS256 with a shared secret": (
        {"key": HMAC_SECRET, "algorithms": ["RS256"]},
        "RS256 need a public key",
    ),
    "short HMAC secret": (
        {"key": "short", "algorithms": ["HS256"]},
        "identity.jwt.key: The HMAC key is 5 bytes long",
    ),
    "no algorithm fits the key": ({"algorithms": ["ES256"]}, "none of ES256 fits"),
    "weak RSA key": ({"key": public_pem(WEAK_RSA)}, "1024 bits"),
    "not a key": (
        {"key": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"},
        "identity.jwt.key: not a usable PEM",
    ),
    "missing key file": (
        {"key": None, "key_file": "/nonexistent/jwt.pem"},
        "identity.jwt.key_file: cannot read",
    ),
    "key and key file": ({"key_file": "/nonexistent/jwt.pem"}, "not both"),
}


@pytest.mark.parametrize(("settings", "message"), BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_unusable_keys_are_refused_at_build(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_identity_provider(rsa_config(**settings))
    assert message in str(caught.value)
