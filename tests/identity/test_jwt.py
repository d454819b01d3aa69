"""The jwt source: signed tokens from a cookie or a header, and the key checks at build."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from sidecar.config import Config, ConfigError
from sidecar.identity import IdentityUnavailable, build_identity_provider
from sidecar.identity.jwt import JwtProvider
from sidecar.identity.refusals import TokenRefusal, TokenRefusals
from sidecar.logs import FIELDS
from tests.identity.stub_console import FORWARDING, headers, make_config
from tests.identity.tokens import (
    AUDIENCE,
    EC_KEY,
    HMAC_SECRET,
    ISSUER,
    OTHER_RSA_KEY,
    RSA_KEY,
    b64,
    bearer,
    claims,
    cookie,
    forged_hs256,
    jwt_section,
    private_pem,
    public_pem,
    rs256,
    unsigned,
)


def rsa_config(**jwt_settings: Any) -> Config:
    return make_config(
        source="jwt", jwt=jwt_section(**jwt_settings), admin_roles=["admin", "owner"]
    )


@dataclass(frozen=True)
class Case:
    lines: Callable[[], tuple[tuple[str, str], ...]]
    expected: tuple[str, str | None, str | None, bool] | None  # user, email, role, bearer_only


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
    "a broken cookie token does not hide a valid header token, and makes it a browser's": Case(
        lambda: (cookie("junk"), bearer(rs256())), ("u-alice", "alice@example.com", "member", False)
    ),
    "an expired cookie token makes the header token a browser's": Case(
        lambda: (cookie(rs256(exp=int(time.time()) - 120)), bearer(rs256())),
        ("u-alice", "alice@example.com", "member", False),
    ),
    "no token": Case(lambda: (("Cookie", "theme=dark"),), None),
    "basic authorization is not a token": Case(lambda: (("Authorization", "Basic dTpw"),), None),
    "expired within the 30 s leeway": Case(
        lambda: (bearer(rs256(exp=int(time.time()) - 10)),), ALICE_MEMBER
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
        got = (identity.user_id, identity.email, identity.role, identity.bearer_only)
        assert got == case.expected
        assert not identity.api_token  # no identity.jwt.api_token configured


def signed_payload(payload: bytes, key: rsa.RSAPrivateKey = RSA_KEY) -> str:
    """An RS256 token over raw ``payload`` bytes (PyJWT's encode insists on an object)."""
    return jwt.api_jws.encode(payload, key, algorithm="RS256")


def tampered() -> str:
    header, _, signature = rs256().split(".")
    return ".".join([header, b64(json.dumps(claims(sub="u-bob")).encode()), signature])


@dataclass(frozen=True)
class Refused:
    token: Callable[[], str]
    reason: TokenRefusal
    answer: str  # "503" (IdentityUnavailable) or "anonymous"
    settings: tuple[tuple[str, Any], ...] = ()


REFUSALS = {
    # Not the issuer's, or no longer valid: the console refuses them too.
    "expired": Refused(
        lambda: rs256(exp=int(time.time()) - 120), TokenRefusal.EXPIRED, "anonymous"
    ),
    "signed by another key": Refused(
        lambda: jwt.encode(claims(), OTHER_RSA_KEY, algorithm="RS256"),
        TokenRefusal.BAD_SIGNATURE,
        "anonymous",
    ),
    "claims changed after signing": Refused(tampered, TokenRefusal.BAD_SIGNATURE, "anonymous"),
    "unparsable claims under another key's signature": Refused(
        lambda: jwt.encode(claims(exp="never"), OTHER_RSA_KEY, algorithm="RS256"),
        TokenRefusal.BAD_SIGNATURE,
        "anonymous",
    ),
    "not a JWT": Refused(lambda: "not-a-jwt", TokenRefusal.MALFORMED, "anonymous"),
    "three segments of junk": Refused(lambda: "a.b.c", TokenRefusal.MALFORMED, "anonymous"),
    "an opaque API key": Refused(lambda: "glpat-" + "x" * 20, TokenRefusal.MALFORMED, "anonymous"),
    # Signed with our key but refused by the sidecar's own checks: the console may accept it.
    "not yet valid (nbf)": Refused(
        lambda: rs256(nbf=int(time.time()) + 120), TokenRefusal.NOT_YET_VALID, "503"
    ),
    "issued in the future (iat)": Refused(
        lambda: rs256(iat=int(time.time()) + 120), TokenRefusal.NOT_YET_VALID, "503"
    ),
    "without exp": Refused(lambda: rs256(exp=None), TokenRefusal.MISSING_CLAIM, "503"),
    "without aud while one is configured": Refused(
        lambda: rs256(aud=None), TokenRefusal.MISSING_CLAIM, "503"
    ),
    "wrong audience": Refused(lambda: rs256(aud="other-app"), TokenRefusal.WRONG_AUDIENCE, "503"),
    "an audience while none is configured": Refused(
        rs256, TokenRefusal.WRONG_AUDIENCE, "503", settings=(("audience", None),)
    ),
    "wrong issuer": Refused(
        lambda: rs256(iss="https://evil.example"), TokenRefusal.WRONG_ISSUER, "503"
    ),
    "exp that is not a number": Refused(
        lambda: rs256(exp="never"), TokenRefusal.INVALID_CLAIMS, "503"
    ),
    "claims that are not an object": Refused(
        lambda: signed_payload(b"[1, 2]"), TokenRefusal.INVALID_CLAIMS, "503"
    ),
    "without the id claim": Refused(lambda: rs256(sub=None), TokenRefusal.NO_USER_ID, "503"),
    # An algorithm the sidecar does not accept: it cannot check the signature at all.
    "RS512 with our key, only RS256 allowed": Refused(
        lambda: jwt.encode(claims(), RSA_KEY, algorithm="RS512"),
        TokenRefusal.ALGORITHM_NOT_ALLOWED,
        "503",
    ),
    "alg none": Refused(unsigned, TokenRefusal.ALGORITHM_NOT_ALLOWED, "503"),
    "HS256 signed with the public key": Refused(
        lambda: forged_hs256(public_pem(RSA_KEY).encode()),
        TokenRefusal.ALGORITHM_NOT_ALLOWED,
        "503",
    ),
}


def refusal_counts(registry: CollectorRegistry) -> dict[TokenRefusal, float | None]:
    return {
        reason: registry.get_sample_value(
            "sidecar_identity_token_refusals_total", {"reason": reason.value}
        )
        for reason in TokenRefusal
    }


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
async def test_refused_tokens_fail_closed_unless_expired_or_not_ours(case: Refused) -> None:
    registry = CollectorRegistry()
    refusals = TokenRefusals(registry)
    assert set(refusal_counts(registry).values()) == {0.0}  # every reason from the start
    provider = build_identity_provider(rsa_config(**dict(case.settings)), refusals=refusals)
    request = headers(bearer(case.token()))
    assert case.reason.fails_closed is (case.answer == "503")
    if case.answer == "503":
        with pytest.raises(IdentityUnavailable):
            await provider.identify(request, peer_trusted=False, forwarding=FORWARDING)
    else:
        assert await provider.identify(request, peer_trusted=False, forwarding=FORWARDING) is None
    assert refusal_counts(registry) == {
        reason: 1.0 if reason is case.reason else 0.0 for reason in TokenRefusal
    }


def test_every_refusal_reason_is_attacked_above() -> None:
    assert {case.reason for case in REFUSALS.values()} == set(TokenRefusal)


async def test_a_refused_cookie_token_fails_closed_too() -> None:
    provider = build_identity_provider(rsa_config())
    with pytest.raises(IdentityUnavailable, match=r"token refused \(wrong_audience\)"):
        await provider.identify(
            headers(cookie(rs256(aud="other-app"))), peer_trusted=False, forwarding=FORWARDING
        )


async def test_a_refused_token_next_to_a_valid_one_fails_closed() -> None:
    # The console might read the other token, whose user the sidecar never checked.
    provider = build_identity_provider(rsa_config())
    lines = (cookie(rs256()), bearer(rs256(sub="u-bob", iss="https://other.example")))
    with pytest.raises(IdentityUnavailable):
        await provider.identify(headers(*lines), peer_trusted=False, forwarding=FORWARDING)


async def test_refusals_are_logged_once_per_reason_and_never_with_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = build_identity_provider(rsa_config())
    refused = [rs256(aud="other-app"), rs256(aud="third-app"), rs256(exp=None), rs256(exp=None)]
    anonymous = [rs256(exp=int(time.time()) - 120), "not-a-jwt"]
    with caplog.at_level(logging.DEBUG, logger="sidecar.identity.jwt"):
        for token in refused:
            with pytest.raises(IdentityUnavailable):
                await provider.identify(
                    headers(bearer(token)), peer_trusted=False, forwarding=FORWARDING
                )
        for token in anonymous:
            await provider.identify(
                headers(bearer(token)), peer_trusted=False, forwarding=FORWARDING
            )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [getattr(r, FIELDS)["reason"] for r in warnings] == ["wrong_audience", "missing_claim"]
    assert "identity.jwt.audience" in warnings[0].getMessage()
    assert getattr(warnings[1], FIELDS)["claim"] == "exp"
    logged = caplog.text + repr([r.__dict__ for r in caplog.records])
    for token in refused + anonymous[:1]:
        for part in token.split("."):
            assert part not in logged


# --- API tokens: identity.jwt.api_token ------------------------------------------------------

API_RULE = {"claim": "token_use", "value": "api"}


@dataclass(frozen=True)
class ApiCase:
    lines: Callable[[], tuple[tuple[str, str], ...]]
    rule: dict[str, str] | None
    api_token: bool


API_CASES = {
    "a header token with the claim": ApiCase(
        lambda: (bearer(rs256(token_use="api")),), API_RULE, True
    ),
    "a list holding the value": ApiCase(
        lambda: (bearer(rs256(token_use=["read", "api"])),), API_RULE, True
    ),
    "nested claim": ApiCase(
        lambda: (bearer(rs256(ext={"kind": "api"})),), {"claim": "ext.kind", "value": "api"}, True
    ),
    "by audience, a list": ApiCase(
        lambda: (bearer(rs256(aud=[AUDIENCE, "console-api"])),),
        {"claim": "aud", "value": "console-api"},
        True,
    ),
    "by issuer": ApiCase(lambda: (bearer(rs256()),), {"claim": "iss", "value": ISSUER}, True),
    "no rule: no API token": ApiCase(lambda: (bearer(rs256(token_use="api")),), None, False),
    "the browser's session token as a bearer token": ApiCase(
        lambda: (bearer(rs256()),), API_RULE, False
    ),
    "wrong value": ApiCase(lambda: (bearer(rs256(token_use="id")),), API_RULE, False),
    "not a string": ApiCase(
        lambda: (bearer(rs256(token_use=True)),), {"claim": "token_use", "value": "True"}, False
    ),
    "an object is no value": ApiCase(
        lambda: (bearer(rs256(ext={"kind": "api"})),), {"claim": "ext", "value": "api"}, False
    ),
    "the claim in a cookie token": ApiCase(
        lambda: (cookie(rs256(token_use="api")),), API_RULE, False
    ),
    "a cookie token next to the API token": ApiCase(
        lambda: (cookie(rs256()), bearer(rs256(token_use="api"))), API_RULE, False
    ),
    "both tokens with the claim": ApiCase(
        lambda: (cookie(rs256(token_use="api")), bearer(rs256(token_use="api"))), API_RULE, False
    ),
    "an expired cookie token next to the API token": ApiCase(
        lambda: (cookie(rs256(exp=int(time.time()) - 120)), bearer(rs256(token_use="api"))),
        API_RULE,
        False,
    ),
    "a broken cookie token next to the API token": ApiCase(
        lambda: (cookie("junk"), bearer(rs256(token_use="api"))), API_RULE, False
    ),
}


@pytest.mark.parametrize("case", API_CASES.values(), ids=API_CASES.keys())
async def test_api_tokens_are_header_tokens_with_the_claim(case: ApiCase) -> None:
    provider = build_identity_provider(rsa_config(api_token=case.rule))
    identity = await provider.identify(
        headers(*case.lines()), peer_trusted=False, forwarding=FORWARDING
    )
    assert identity is not None
    assert identity.api_token is case.api_token


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
    assert (identity.user_id, identity.email, identity.role, identity.bearer_only) == (
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
