"""Recovery codes: what the user is shown, what they may type back, and how it is stored."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.mfa import recovery

# Written out here rather than taken from the module, so a wrong alphabet there shows up.
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
DISPLAYED = re.compile(f"[{CROCKFORD}]{{5}}-[{CROCKFORD}]{{5}}")

KEY = recovery.hashing_key("data-key-one")
OTHER_KEY = recovery.hashing_key("data-key-two")


def test_first_enrollment_shows_ten_unique_codes() -> None:
    codes = recovery.generate()
    assert len(codes) == 10
    assert len(set(codes)) == 10
    for code in codes:
        assert DISPLAYED.fullmatch(code), code


def test_generated_codes_use_only_crockford_letters() -> None:
    seen = set("".join(recovery.generate(200)).replace("-", ""))
    # No I, L, O or U: nothing the user could misread.
    assert seen <= set(CROCKFORD)
    assert not seen & set("ILOU")


def test_generated_codes_read_back_as_themselves() -> None:
    for code in recovery.generate():
        assert recovery.normalize(code) == code.replace("-", "")


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        pytest.param("ABCDE-FGHJK", "ABCDEFGHJK", id="as shown"),
        pytest.param("ABCDEFGHJK", "ABCDEFGHJK", id="without the hyphen"),
        pytest.param("abcde-fghjk", "ABCDEFGHJK", id="lower case"),
        pytest.param("aBcDe-FgHjK", "ABCDEFGHJK", id="mixed case"),
        pytest.param("abcde fghjk", "ABCDEFGHJK", id="space instead of hyphen"),
        pytest.param("  ABCDE-FGHJK\n", "ABCDEFGHJK", id="surrounding whitespace"),
        pytest.param("AB CD-EF GH-JK", "ABCDEFGHJK", id="spaces and hyphens anywhere"),
        pytest.param("ABCDE--FGHJK", "ABCDEFGHJK", id="double hyphen"),
        pytest.param("IIIII-LLLLL", "1111111111", id="I and L read as 1"),
        pytest.param("iiiii-lllll", "1111111111", id="lower-case i and l read as 1"),
        pytest.param("OOOOO-ooooo", "0000000000", id="O read as 0"),
        pytest.param("0O1IL-ABCDE", "00111ABCDE", id="confusables mixed with digits"),
    ],
)
def test_normalize_accepts_what_people_type(typed: str, canonical: str) -> None:
    assert recovery.normalize(typed) == canonical


@pytest.mark.parametrize(
    "typed",
    [
        pytest.param("", id="empty"),
        pytest.param("ABCDE-FGHJ", id="nine characters"),
        pytest.param("ABCDE-FGHJKM", id="eleven characters"),
        pytest.param("UUUUU-00000", id="U is not Crockford"),
        pytest.param("ABCDE-FGHJU", id="one U"),
        pytest.param("ABCDE_FGHJK", id="underscore separator"),
        pytest.param("ABCDE.FGHJK", id="dot separator"),
        pytest.param("ABCDE-FGHJ!", id="punctuation"),
        pytest.param("ÄBCDE-FGHJK", id="non-ASCII letter"),
        pytest.param("ABCDE-FGHJK-ABCDE-FGHJK", id="two codes"),
        pytest.param("123456", id="a TOTP code"),
    ],
)
def test_normalize_rejects_what_cannot_be_a_code(typed: str) -> None:
    assert recovery.normalize(typed) is None
    assert recovery.code_hash(KEY, typed) is None


@pytest.mark.parametrize(
    "typed",
    [
        pytest.param("abcde-0ghjk", id="lower case"),
        pytest.param("ABCDE0GHJK", id="no hyphen"),
        pytest.param("ABCDE OGHJK", id="space, O for 0"),
        pytest.param(" a b c d e - o g h j k ", id="spaced out"),
    ],
)
def test_equivalent_inputs_hash_alike(typed: str) -> None:
    """A code the user types in any accepted form finds its stored hash."""
    assert recovery.code_hash(KEY, typed) == recovery.code_hash(KEY, "ABCDE-0GHJK")


def test_hashes_are_stable_across_restarts() -> None:
    stored = recovery.code_hash(recovery.hashing_key("data-key-one"), "ABCDE-0GHJK")
    assert recovery.code_hash(KEY, "ABCDE-0GHJK") == stored


def test_different_codes_hash_differently() -> None:
    assert recovery.code_hash(KEY, "ABCDE-0GHJK") != recovery.code_hash(KEY, "ABCDE-0GHJM")


def test_different_keys_hash_differently() -> None:
    """A dump of one deployment's hashes is no use against another's codes (and no use
    without the data key at all)."""
    assert KEY != OTHER_KEY
    assert recovery.code_hash(KEY, "ABCDE-0GHJK") != recovery.code_hash(OTHER_KEY, "ABCDE-0GHJK")


def test_hashing_key_is_not_the_data_key() -> None:
    assert recovery.hashing_key("data-key-one") != b"data-key-one"
    assert len(recovery.hashing_key("data-key-one")) == 32


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_and_hash_never_raise(typed: str) -> None:
    canonical = recovery.normalize(typed)
    digest = recovery.code_hash(KEY, typed)
    assert (canonical is None) == (digest is None)
    if canonical is not None:
        assert len(canonical) == 10
        assert set(canonical) <= set(CROCKFORD)
        assert recovery.normalize(canonical) == canonical


codes = st.text(alphabet=CROCKFORD, min_size=10, max_size=10)


@settings(max_examples=200, deadline=None)
@given(
    code=codes,
    lower=st.lists(st.booleans(), min_size=10, max_size=10),
    gaps=st.lists(st.sampled_from(["", "", " ", "-", "  ", "\t"]), min_size=11, max_size=11),
)
def test_any_typing_of_a_code_matches_its_hash(
    code: str, lower: list[bool], gaps: list[str]
) -> None:
    typed = gaps[0] + "".join(
        (c.lower() if low else c) + gap for c, low, gap in zip(code, lower, gaps[1:], strict=True)
    )
    assert recovery.code_hash(KEY, typed) == recovery.code_hash(KEY, f"{code[:5]}-{code[5:]}")
