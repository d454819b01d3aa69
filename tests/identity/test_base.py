"""Shared identity helpers: privilege, role choice, field lookup, credential framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.identity import Identity, is_privileged
from sidecar.identity.base import (
    bearer_token,
    choose_role,
    console_cookies,
    cookie_pairs,
    credential_hash,
    lookup_field,
    marks_api_token,
    user_id_from,
)

ADMIN_ROLES = ("admin", "owner")


def identity(role: str | None) -> Identity:
    return Identity(
        "u-1", None, role, bearer_only=False, api_token=False, credential_hash=b"\x00" * 32
    )


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


CONSOLE_COOKIES = {
    "well-formed pairs joined in order": (["a=1;b=2 "], None, ["a=1; b=2"]),
    "own cookie removed": (["a=1; sid=x; b=2"], None, ["a=1; b=2"]),
    "several lines become one": (["sid=x", "a=1", "b=2"], None, ["a=1; b=2"]),
    "all occurrences of our cookie": (["sid=x; sid=y"], None, []),
    "blank lines dropped": (["", "  "], None, []),
    "similar names kept": (["sidx=1; xsid=2"], None, ["sidx=1; xsid=2"]),
    "space-separated pair dropped whole": (["sid =a console=alice"], None, []),
    "value with a space dropped": (["theme=dark console=alice; a=1"], None, ["a=1"]),
    "value with a comma dropped": (["theme=x,console=alice"], None, []),
    "name that is not a token dropped": (["a b=1; c=2"], None, ["c=2"]),
    "base64 padding kept": (["t=YWJj=="], None, ["t=YWJj=="]),
    "only the named cookies": (["a=1; console=x; b=2"], ["console"], ["console=x"]),
    "named cookie absent": (["a=1"], ["console"], []),
}


@pytest.mark.parametrize(
    ("lines", "only", "expected"), CONSOLE_COOKIES.values(), ids=CONSOLE_COOKIES.keys()
)
def test_console_cookies(lines: list[str], only: list[str] | None, expected: list[str]) -> None:
    assert console_cookies(lines, "sid", only) == expected


cookie_text = st.text(alphabet=st.sampled_from("sid=; ab1\t,"), max_size=30)


@given(st.lists(cookie_text, max_size=4))
def test_console_cookies_never_keep_ours_and_parse_the_same_everywhere(lines: list[str]) -> None:
    from http.cookies import SimpleCookie

    for line in console_cookies(lines, "sid"):
        names = [name for name, _ in cookie_pairs(line)]
        assert "sid" not in names
        # A lenient parser reads exactly the pairs we judged.
        lenient = SimpleCookie()
        lenient.load(line)
        assert sorted(lenient.keys()) == sorted(set(names))


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
    shown = repr(
        Identity("u-1", "e", "r", bearer_only=False, api_token=False, credential_hash=secret)
    )
    assert "u-1" in shown
    assert "credential_hash" not in shown
    assert secret.hex() not in shown


def test_an_api_token_identity_is_always_bearer_only() -> None:
    # A browser request (a cookie next to the token) can never come out as an API client.
    with pytest.raises(ValueError, match="bearer-only"):
        Identity("u-1", None, None, bearer_only=False, api_token=True, credential_hash=b"")


MARKERS = {
    "the value": ("api", True),
    "a list holding it": (["console", "api"], True),
    "another value": ("session", False),
    "a prefix of it": ("ap", False),
    "other case": ("API", False),
    "with spaces": (" api", False),
    "absent": (None, False),
    "empty string": ("", False),
    "true": (True, False),
    "a number": (1, False),
    "an object holding it": ({"api": "api"}, False),
    "a list without it": (["console"], False),
    "a nested list holding it": ([["api"]], False),
    "a space-separated string holding it": ("read api", False),
}


@pytest.mark.parametrize(("value", "expected"), MARKERS.values(), ids=MARKERS.keys())
def test_marks_api_token(value: object, expected: bool) -> None:
    assert marks_api_token(value, "api") is expected
