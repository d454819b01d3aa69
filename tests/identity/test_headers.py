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
    expected: tuple[str, str | None, str | None, bool] | None  # user, email, role, bearer_only
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
    "bearer token is bearer-only": Case(
        (USER, ("Authorization", "Bearer xyz")), ("u-alice", None, None, True)
    ),
    "bearer plus a console cookie is a browser": Case(
        (USER, ("Authorization", "Bearer xyz"), ("Cookie", "_oauth2_proxy=abc")),
        ("u-alice", None, None, False),
    ),
    "bearer plus only the sidecar cookie is bearer-only": Case(
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
        got = (identity.user_id, identity.email, identity.role, identity.bearer_only)
        assert got == case.expected
        # The auth proxy says who, not with which kind of credential: never an API token.
        assert not identity.api_token


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


# --- binding to the auth proxy's session (identity.headers.session_cookie) -----------------

PROXY_COOKIE = "_oauth2_proxy"


def cookie(value: str) -> tuple[str, str]:
    return ("Cookie", value)


async def binding_of(provider: HeadersProvider, *lines: tuple[str, str]) -> bytes:
    identity = await provider.identify(headers(*lines), peer_trusted=True, forwarding=FORWARDING)
    assert identity is not None
    return identity.credential_hash


def bound_provider() -> HeadersProvider:
    return HeadersProvider.from_config(
        make_config(source="headers", headers={"session_cookie": PROXY_COOKIE})
    )


async def test_without_a_session_cookie_the_binding_survives_a_proxy_relogin() -> None:
    # What holds by default (README): the verification lasts until mfa.verify_every, across
    # logouts and logins at the auth proxy.
    provider = HeadersProvider.from_config(make_config(source="headers"))
    first = await binding_of(provider, USER, EMAIL, cookie(f"{PROXY_COOKIE}=session-1"))
    again = await binding_of(provider, USER, EMAIL, cookie(f"{PROXY_COOKIE}=session-2"))
    assert first == again


SAME_SESSION = {
    "the sidecar's own cookie changes": (
        f"{PROXY_COOKIE}=session-1; {SIDECAR_COOKIE}=one",
        f"{SIDECAR_COOKIE}=two; {PROXY_COOKIE}=session-1",
    ),
    "an unrelated cookie changes": (
        f"{PROXY_COOKIE}=session-1; theme=dark",
        f"theme=light; {PROXY_COOKIE}=session-1",
    ),
    "spaces around the pair": (f"{PROXY_COOKIE}=session-1", f"  {PROXY_COOKIE}=session-1 ;"),
}


@pytest.mark.parametrize(("one", "other"), SAME_SESSION.values(), ids=SAME_SESSION.keys())
async def test_the_same_proxy_session_is_the_same_binding(one: str, other: str) -> None:
    provider = bound_provider()
    assert await binding_of(provider, USER, cookie(one)) == await binding_of(
        provider, USER, cookie(other)
    )


NEW_SESSION = {
    "a new proxy login": (f"{PROXY_COOKIE}=session-1", f"{PROXY_COOKIE}=session-2"),
    "a new split session": (
        f"{PROXY_COOKIE}_0=part-a; {PROXY_COOKIE}_1=part-b",
        f"{PROXY_COOKIE}_0=part-a; {PROXY_COOKIE}_1=part-c",
    ),
    "a second cookie of the same name added": (
        f"{PROXY_COOKIE}=session-1",
        f"{PROXY_COOKIE}=session-1; {PROXY_COOKIE}=session-2",
    ),
    "whole and split": (f"{PROXY_COOKIE}=ab", f"{PROXY_COOKIE}_0=a; {PROXY_COOKIE}_1=b"),
}


@pytest.mark.parametrize(("one", "other"), NEW_SESSION.values(), ids=NEW_SESSION.keys())
async def test_a_new_proxy_session_is_a_new_binding(one: str, other: str) -> None:
    provider = bound_provider()
    assert await binding_of(provider, USER, cookie(one)) != await binding_of(
        provider, USER, cookie(other)
    )


async def test_the_session_cookie_is_bound_in_addition_to_the_asserted_identity() -> None:
    provider = bound_provider()
    alice = await binding_of(provider, USER, cookie(f"{PROXY_COOKIE}=session-1"))
    bob = await binding_of(
        provider, ("X-Forwarded-User", "u-bob"), cookie(f"{PROXY_COOKIE}=session-1")
    )
    assert alice != bob


MISSING_SESSION = {
    "no cookie at all": (USER, EMAIL),
    "other cookies only": (USER, cookie("theme=dark; console=abc")),
    "an empty value (a logout's cleared cookie)": (USER, cookie(f"{PROXY_COOKIE}=")),
    "another spelling (cookie names are case-sensitive)": (USER, cookie("_OAUTH2_PROXY=s")),
    "a longer name": (USER, cookie(f"{PROXY_COOKIE}x=s; {PROXY_COOKIE}_csrf=s")),
    "split parts that do not start at 0": (USER, cookie(f"{PROXY_COOKIE}_1=s")),
    "inside another cookie's value": (USER, cookie(f"other={PROXY_COOKIE}=s")),
    "a bearer token next to a cookie": (
        USER,
        cookie("theme=dark"),
        ("Authorization", "Bearer tok"),
    ),
}


@pytest.mark.parametrize("lines", MISSING_SESSION.values(), ids=MISSING_SESSION.keys())
async def test_a_vouched_request_without_the_session_cookie_fails_closed(
    lines: tuple[tuple[str, str], ...],
) -> None:
    # Binding to nothing would quietly drop the promise; anonymous would skip the MFA gate.
    with pytest.raises(IdentityUnavailable, match=f"session cookie '{PROXY_COOKIE}'"):
        await bound_provider().identify(headers(*lines), peer_trusted=True, forwarding=FORWARDING)


async def test_a_bearer_request_without_the_session_cookie_is_bound_to_its_token() -> None:
    # oauth2-proxy passes JWT bearer requests through without a cookie: the token is the
    # credential, and a new token is a new binding.
    provider = bound_provider()
    identity = await provider.identify(
        headers(USER, ("Authorization", "Bearer tok-1")), peer_trusted=True, forwarding=FORWARDING
    )
    assert identity is not None
    assert identity.bearer_only
    other = await binding_of(provider, USER, ("Authorization", "Bearer tok-2"))
    assert identity.credential_hash != other


async def test_without_a_vouched_user_no_session_cookie_is_needed() -> None:
    provider = bound_provider()
    assert await provider.identify(headers(EMAIL), peer_trusted=True, forwarding=FORWARDING) is None
    assert (
        await provider.identify(headers(USER, EMAIL), peer_trusted=False, forwarding=FORWARDING)
        is None
    )
