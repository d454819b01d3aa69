"""The headers source: identity headers believed from trusted proxies only."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from multidict import CIMultiDict

from sidecar.identity import (
    IdentityUnavailable,
    build_identity_provider,
    identity_header_names,
    strip_identity_headers,
)
from sidecar.identity.headers import HeadersProvider
from tests.identity.stub_console import FORWARDING, SIDECAR_COOKIE, headers, make_config

USER = ("X-Forwarded-User", "u-alice")
EMAIL = ("X-Forwarded-Email", "alice@example.com")


@dataclass(frozen=True)
class Case:
    lines: tuple[tuple[str, str], ...]
    expected: tuple[str, str | None, str | None, bool] | None  # user, email, role, via_token
    peer_trusted: bool = True


CASES = {
    "untrusted peer is never believed": Case((USER, EMAIL), None, peer_trusted=False),
    "no user header": Case((EMAIL, ("X-Forwarded-Groups", "admin")), None),
    "blank user header": Case((("X-Forwarded-User", " "),), None),
    "user only": Case((USER,), ("u-alice", None, None, False)),
    "user and email": Case((USER, EMAIL), ("u-alice", "alice@example.com", None, False)),
    "header names are case-insensitive": Case(
        (("x-forwarded-user", "u-alice"),), ("u-alice", None, None, False)
    ),
    "first admin group wins": Case(
        (USER, ("X-Forwarded-Groups", "dev, owner,admin")), ("u-alice", None, "owner", False)
    ),
    "admin roles compare case-insensitively": Case(
        (USER, ("X-Forwarded-Groups", "dev,Admin")), ("u-alice", None, "Admin", False)
    ),
    "no admin group: the first group": Case(
        (USER, ("X-Forwarded-Groups", " ,dev,ops")), ("u-alice", None, "dev", False)
    ),
    "groups over several lines": Case(
        (USER, ("X-Forwarded-Groups", "dev"), ("X-Forwarded-Groups", "admin")),
        ("u-alice", None, "admin", False),
    ),
    "repeated identical user lines": Case((USER, USER), ("u-alice", None, None, False)),
    "bearer token is an API client": Case(
        (USER, ("Authorization", "Bearer xyz")), ("u-alice", None, None, True)
    ),
    "bearer plus a console cookie is a browser": Case(
        (USER, ("Authorization", "Bearer xyz"), ("Cookie", "_oauth2_proxy=abc")),
        ("u-alice", None, None, False),
    ),
    "bearer plus only the sidecar cookie is an API client": Case(
        (USER, ("Authorization", "Bearer xyz"), ("Cookie", f"{SIDECAR_COOKIE}=s")),
        ("u-alice", None, None, True),
    ),
    "basic authorization is not a token": Case(
        (USER, ("Authorization", "Basic dTpw")), ("u-alice", None, None, False)
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_identity_from_headers(case: Case) -> None:
    provider = build_identity_provider(make_config(source="headers"))
    identity = await provider.identify(
        headers(*case.lines), peer_trusted=case.peer_trusted, forwarding=FORWARDING
    )
    if case.expected is None:
        assert identity is None
    else:
        assert identity is not None
        got = (identity.user_id, identity.email, identity.role, identity.via_token)
        assert got == case.expected


AMBIGUOUS = {
    "two users": (USER, ("X-Forwarded-User", "u-mallory")),
    "two emails": (USER, EMAIL, ("X-Forwarded-Email", "mallory@example.com")),
}


@pytest.mark.parametrize("lines", AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
async def test_ambiguous_identity_fails_closed(lines: tuple[tuple[str, str], ...]) -> None:
    provider = HeadersProvider.from_config(make_config(source="headers"))
    with pytest.raises(IdentityUnavailable, match="different"):
        await provider.identify(headers(*lines), peer_trusted=True, forwarding=FORWARDING)


async def test_custom_header_names() -> None:
    config = make_config(
        source="headers",
        headers={"user": "Remote-User", "email": "Remote-Email", "groups": "Remote-Groups"},
    )
    provider = build_identity_provider(config)
    identity = await provider.identify(
        headers(
            USER,
            ("Remote-User", "u-bob"),
            ("Remote-Email", "bob@example.com"),
            ("Remote-Groups", "owner"),
        ),
        peer_trusted=True,
        forwarding=FORWARDING,
    )
    assert identity is not None
    assert (identity.user_id, identity.email, identity.role) == (
        "u-bob",
        "bob@example.com",
        "owner",
    )


async def test_credential_hash_follows_the_asserted_identity() -> None:
    provider = HeadersProvider.from_config(make_config(source="headers"))

    async def hash_of(*lines: tuple[str, str]) -> bytes:
        identity = await provider.identify(
            headers(*lines), peer_trusted=True, forwarding=FORWARDING
        )
        assert identity is not None
        return identity.credential_hash

    base = await hash_of(USER, EMAIL, ("X-Forwarded-Groups", "dev"))
    assert base == await hash_of(USER, EMAIL, ("X-Forwarded-Groups", "dev"))
    assert base != await hash_of(USER, EMAIL, ("X-Forwarded-Groups", "admin"))
    assert base != await hash_of(USER, ("X-Forwarded-Groups", "dev"))
    assert base != await hash_of(
        ("X-Forwarded-User", "u-bob"), EMAIL, ("X-Forwarded-Groups", "dev")
    )


def test_identity_header_names_cover_configured_and_oauth2_proxy_headers() -> None:
    names = identity_header_names(make_config(headers={"user": "Remote-User"}))
    assert {"remote-user", "x-forwarded-email", "x-forwarded-groups"} <= names
    assert {"x-forwarded-user", "x-auth-request-user", "x-forwarded-access-token"} <= names
    assert all(name == name.lower() for name in names)


def test_strip_identity_headers_removes_every_line_and_nothing_else() -> None:
    request_headers = CIMultiDict(
        [
            ("X-Forwarded-User", "u-admin"),
            ("x-forwarded-user", "u-other"),
            ("X-Forwarded-Groups", "admin"),
            ("Cookie", "a=b"),
            ("X-Forwarded-For", "10.0.0.1"),
        ]
    )
    removed = strip_identity_headers(request_headers, identity_header_names(make_config()))
    assert sorted(name.lower() for name in removed) == ["x-forwarded-groups", "x-forwarded-user"]
    assert list(request_headers.items()) == [("Cookie", "a=b"), ("X-Forwarded-For", "10.0.0.1")]
