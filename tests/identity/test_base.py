"""Shared identity helpers: privilege, role choice, field lookup, credential framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.identity import Identity, is_privileged
from sidecar.identity.base import (
    bearer_token,
    choose_role,
    cookie_pairs,
    credential_hash,
    lookup_field,
    user_id_from,
    without_cookie,
)

ADMIN_ROLES = ("admin", "owner")


def identity(role: str | None) -> Identity:
    return Identity("u-1", None, role, via_token=False, credential_hash=b"\x00" * 32)


PRIVILEGED = {
    "admin": ("admin", True),
    "Owner, other case": ("Owner", True),
    "ADMIN": ("ADMIN", True),
    "member": ("member", False),
    "no role": (None, False),
    "prefix is not a match": ("administrator", False),
}


@pytest.mark.parametrize(("role", "expected"), PRIVILEGED.values(), ids=PRIVILEGED.keys())
def test_is_privileged(role: str | None, expected: bool) -> None:
    assert is_privileged(identity(role), ADMIN_ROLES) is expected


ROLES: dict[str, tuple[object, str | None]] = {
    "string": ("member", "member"),
    "empty string": ("", None),
    "list: first admin": (["viewer", "OWNER", "admin"], "OWNER"),
    "list: no admin, first": (["viewer", "member"], "viewer"),
    "list: non-strings skipped": ([3, None, "", "member"], "member"),
    "empty list": ([], None),
    "number": (5, None),
    "object": ({"admin": True}, None),
}


@pytest.mark.parametrize(("value", "expected"), ROLES.values(), ids=ROLES.keys())
def test_choose_role(value: object, expected: str | None) -> None:
    assert choose_role(value, ADMIN_ROLES) == expected


DOCUMENT = {"id": "a", "user": {"id": 7, "profile": {"mail": "m"}}, "x.y": "dotted", "l": [1]}
LOOKUPS: dict[str, tuple[str, object]] = {
    "top level": ("id", "a"),
    "dot path": ("user.profile.mail", "m"),
    "a key with a dot wins": ("x.y", "dotted"),
    "missing": ("user.nope", None),
    "through a non-object": ("l.0", None),
    "through a string": ("id.x", None),
}


@pytest.mark.parametrize(("name", "expected"), LOOKUPS.values(), ids=LOOKUPS.keys())
def test_lookup_field(name: str, expected: object) -> None:
    assert lookup_field(DOCUMENT, name) == expected


USER_IDS: dict[str, tuple[object, str | None]] = {
    "string": ("u-1", "u-1"),
    "int": (42, "42"),
    "zero": (0, "0"),
    "bool is not an id": (True, None),
    "empty": ("", None),
    "blank": ("  ", None),
    "float": (1.5, None),
    "null": (None, None),
    "list": (["u-1"], None),
}


@pytest.mark.parametrize(("value", "expected"), USER_IDS.values(), ids=USER_IDS.keys())
def test_user_id_from(value: object, expected: str | None) -> None:
    assert user_id_from(value) == expected


BEARERS = {
    "bearer": ("Bearer abc", "abc"),
    "lower case": ("bearer abc", "abc"),
    "extra spaces": ("  Bearer   abc ", "abc"),
    "basic": ("Basic abc", None),
    "scheme only": ("Bearer", None),
    "scheme and blank": ("Bearer   ", None),
    "glued": ("Bearerabc", None),
}


@pytest.mark.parametrize(("value", "expected"), BEARERS.values(), ids=BEARERS.keys())
def test_bearer_token(value: str, expected: str | None) -> None:
    assert bearer_token(value) == expected


WITHOUT = {
    "untouched line kept byte for byte": (["a=1;b=2 "], ["a=1;b=2 "]),
    "own cookie removed": (["a=1; sid=x; b=2"], ["a=1; b=2"]),
    "line left empty is dropped": (["sid=x", "a=1"], ["a=1"]),
    "all occurrences": (["sid=x; sid=y"], []),
    "blank lines dropped": (["", "  "], []),
    "similar names kept": (["sidx=1; xsid=2"], ["sidx=1; xsid=2"]),
}


@pytest.mark.parametrize(("lines", "expected"), WITHOUT.values(), ids=WITHOUT.keys())
def test_without_cookie(lines: list[str], expected: list[str]) -> None:
    assert without_cookie(lines, "sid") == expected


cookie_text = st.text(alphabet=st.sampled_from("sid=; ab1\t"), max_size=30)


@given(st.lists(cookie_text, max_size=4))
def test_without_cookie_never_leaves_the_cookie(lines: list[str]) -> None:
    for line in without_cookie(lines, "sid"):
        assert "sid" not in [name for name, _ in cookie_pairs(line)]
        assert line.strip()


@given(
    st.lists(st.lists(st.text(max_size=6), max_size=3), min_size=2, max_size=2),
    st.lists(st.lists(st.text(max_size=6), max_size=3), min_size=2, max_size=2),
)
def test_credential_hash_frames_unambiguously(one: list[list[str]], other: list[list[str]]) -> None:
    assert (credential_hash(*one) == credential_hash(*other)) == (one == other)


def test_credential_hash_separates_lines_and_groups() -> None:
    hashes = {
        credential_hash(["a; b"], []),
        credential_hash(["a", "b"], []),
        credential_hash(["a"], ["b"]),
        credential_hash([], ["a", "b"]),
        credential_hash(["a\udcff"], []),  # undecodable header bytes still hash
    }
    assert len(hashes) == 5


def test_identity_repr_hides_the_credential_hash() -> None:
    secret = b"\xab" * 32
    shown = repr(Identity("u-1", "e", "r", via_token=False, credential_hash=secret))
    assert "u-1" in shown
    assert "credential_hash" not in shown
    assert secret.hex() not in shown
