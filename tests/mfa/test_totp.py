"""Authenticator-app codes: RFC 6238 compatibility, the ±1 step window, what typed input
matches, and what the enrollment page shows (secret, otpauth URI, inline QR)."""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.mfa import totp


def b32(seed: bytes) -> str:
    return base64.b32encode(seed).decode()


# RFC 6238 Appendix B, with the per-algorithm seed lengths of errata 2866.
SEEDS = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
RFC_VECTORS = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]


@pytest.mark.parametrize(
    ("digest", "now", "code"),
    [
        pytest.param(digest, now, codes[i], id=f"{digest} t={now} -> {codes[i]}")
        for now, *codes in RFC_VECTORS
        for i, digest in enumerate(SEEDS)
    ],
)
def test_rfc6238_vectors(digest: str, now: int, code: str) -> None:
    step = totp.matching_step(b32(SEEDS[digest]), code, now=now, digits=8, digest=digest)
    assert step == now // 30


SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
T = 56_666_666  # a time step; NOW is in the middle of it
NOW = T * 30 + 15


def code_at(step: int, secret: str = SECRET) -> str:
    return pyotp.TOTP(secret).at(step * 30)


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        pytest.param(-2, False, id="T-2 refused"),
        pytest.param(-1, True, id="T-1 accepted (clock drift)"),
        pytest.param(0, True, id="T accepted"),
        pytest.param(1, True, id="T+1 accepted (clock drift)"),
        pytest.param(2, False, id="T+2 refused"),
    ],
)
def test_window_is_one_step_each_way(offset: int, accepted: bool) -> None:
    step = totp.matching_step(SECRET, code_at(T + offset), now=NOW)
    # The step is what the caller stores to refuse replays, so it must be the code's own.
    assert step == (T + offset if accepted else None)


def test_step_zero_has_no_previous_step() -> None:
    assert totp.matching_step(SECRET, code_at(0), now=10) == 0
    assert totp.matching_step(SECRET, code_at(1), now=10) == 1


def test_another_secret_does_not_match() -> None:
    other = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"
    assert code_at(T, other) != code_at(T)
    assert totp.matching_step(SECRET, code_at(T, other), now=NOW) is None


GOOD = code_at(T)


@pytest.mark.parametrize(
    "typed",
    [
        pytest.param(GOOD, id="as shown"),
        pytest.param(f"{GOOD[:3]} {GOOD[3:]}", id="space in the middle"),
        pytest.param(f"{GOOD[:3]}-{GOOD[3:]}", id="hyphen in the middle"),
        pytest.param(f"  {GOOD}\n", id="surrounding whitespace"),
        pytest.param(" - ".join(GOOD), id="spaces and hyphens everywhere"),
        pytest.param(f"{GOOD[:3]}\t{GOOD[3:]}", id="tab"),
    ],
)
def test_typed_forms_are_normalised(typed: str) -> None:
    assert totp.matching_step(SECRET, typed, now=NOW) == T


@pytest.mark.parametrize(
    "typed",
    [
        pytest.param("", id="empty"),
        pytest.param(GOOD[:5], id="too short"),
        pytest.param(GOOD + "0", id="one digit too many"),
        pytest.param("0" + GOOD, id="leading extra digit"),
        pytest.param(GOOD[:5] + "x", id="letter instead of a digit"),
        pytest.param("abcdef", id="letters"),
        pytest.param(f"{GOOD[:3]}.{GOOD[3:]}", id="dot separator"),
        pytest.param(f"{GOOD[:3]}_{GOOD[3:]}", id="underscore separator"),
        pytest.param(f"+{GOOD[1:]}", id="sign"),
        pytest.param(GOOD * 2, id="code twice"),
    ],
)
def test_wrong_shapes_never_match(typed: str) -> None:
    assert totp.matching_step(SECRET, typed, now=NOW) is None


@settings(max_examples=300, deadline=None)
@given(
    code=st.one_of(
        st.text(),
        st.text(alphabet="0123456789 -\t\u00a0\u0660\uff10\u00b2", max_size=12),
    )
)
@example(code="\udcff" * 6)
@example(code="9" * 100_000)
def test_matching_step_never_raises(code: str) -> None:
    step = totp.matching_step(SECRET, code, now=NOW)
    assert step is None or step in (T - 1, T, T + 1)


def test_new_secret_has_at_least_160_bits() -> None:
    secrets = {totp.new_secret() for _ in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert re.fullmatch(r"[A-Z2-7]+=*", secret)
        raw = base64.b32decode(secret + "=" * (-len(secret) % 8))
        assert len(raw) * 8 >= 160


def test_new_secret_works_with_matching_step() -> None:
    secret = totp.new_secret()
    assert totp.matching_step(secret, code_at(T, secret), now=NOW) == T


ISSUER = "Acme Console"
ACCOUNT = "alice@example.com"


def test_provisioning_uri_names_issuer_and_account() -> None:
    uri = totp.provisioning_uri(SECRET, account=ACCOUNT, issuer=ISSUER)
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    # Authenticator apps show the label "Issuer:account" and group by the issuer parameter.
    assert unquote(parts.path) == f"/{ISSUER}:{ACCOUNT}"
    query = parse_qs(parts.query)
    assert query["issuer"] == [ISSUER]
    assert query["secret"] == [SECRET]


def test_codes_from_the_scanned_uri_are_accepted() -> None:
    """What the user's app computes from the QR code is what the sidecar accepts."""
    app = pyotp.parse_uri(totp.provisioning_uri(SECRET, account=ACCOUNT, issuer=ISSUER))
    assert isinstance(app, pyotp.TOTP)
    assert totp.matching_step(SECRET, app.at(NOW), now=NOW) == T


def test_qr_svg_is_inline_svg_without_external_references() -> None:
    uri = totp.provisioning_uri(SECRET, account=ACCOUNT, issuer=ISSUER)
    svg = totp.qr_svg(uri).strip()
    assert svg.startswith("<svg")
    assert svg.endswith("</svg>")
    # The console may run offline: nothing may be fetched (the SVG namespace is only a name).
    local = svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for reference in ("http", "href", "url(", "<image", "<script", "@import", "//"):
        assert reference not in local.lower()


def test_qr_svg_encodes_its_uri() -> None:
    first = totp.qr_svg(totp.provisioning_uri(SECRET, account=ACCOUNT, issuer=ISSUER))
    other = totp.qr_svg(totp.provisioning_uri(SECRET, account="bob@example.com", issuer=ISSUER))
    assert first != other
