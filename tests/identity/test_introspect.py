"""The introspect source against a stub console: mapping, failures, cache, single-flight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from sidecar.identity import Identity, IdentityUnavailable, build_identity_provider
from sidecar.identity.introspect import IntrospectProvider
from tests.identity.stub_console import (
    SESSION_COOKIE,
    SIDECAR_COOKIE,
    StubConsole,
    headers,
    make_config,
)

ALICE = (("Cookie", f"{SESSION_COOKIE}=u-alice"),)
BOB = (("Cookie", f"{SESSION_COOKIE}=u-bob"),)
CAROL_TOKEN = (("Authorization", "Bearer tok-carol"),)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ProviderFactory = Callable[..., IntrospectProvider]


@pytest.fixture
async def make_provider(
    console: StubConsole,
) -> AsyncIterator[ProviderFactory]:
    """``make_provider(path=..., clock=..., **introspect_settings)``; closed at teardown."""
    made: list[IntrospectProvider] = []

    def factory(
        path: str = "/api/me", clock: Callable[[], float] | None = None, **settings: Any
    ) -> IntrospectProvider:
        config = make_config(console.url, introspect={"path": path, **settings})
        provider = IntrospectProvider.from_config(config, clock=clock or FakeClock())
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.close()


async def identify(provider: IntrospectProvider, *lines: tuple[str, str]) -> Identity | None:
    return await provider.identify(headers(*lines), peer_trusted=False)


# --- mapping -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapped:
    lines: tuple[tuple[str, str], ...]
    expected: tuple[str, str | None, str | None, bool]  # user_id, email, role, via_token
    path: str = "/api/me"
    settings: tuple[tuple[str, str], ...] = ()


MAPPING = {
    "session cookie": Mapped(ALICE, ("u-alice", "alice@example.com", "owner", False)),
    "bearer token is an API client": Mapped(
        CAROL_TOKEN, ("u-carol", "carol@example.com", "member", True)
    ),
    "bearer scheme is case-insensitive": Mapped(
        (("Authorization", "bEaReR tok-carol"),), ("u-carol", "carol@example.com", "member", True)
    ),
    "cookie and bearer together are a browser session": Mapped(
        (*ALICE, *CAROL_TOKEN), ("u-carol", "carol@example.com", "member", False)
    ),
    "bearer plus only the sidecar's own cookie is still a token": Mapped(
        (("Cookie", f"{SIDECAR_COOKIE}=abc"), *CAROL_TOKEN),
        ("u-carol", "carol@example.com", "member", True),
    ),
    "dot paths, integer id, role list picks the admin role": Mapped(
        ALICE,
        ("42", "alice@example.com", "Admin", False),
        path="/api/me-nested",
        settings=(
            ("id_field", "user.id"),
            ("email_field", "user.profile.mail"),
            ("role_field", "user.groups"),
        ),
    ),
    "missing optional fields are None": Mapped(
        ALICE,
        ("42", None, None, False),
        path="/api/me-nested",
        settings=(("id_field", "user.id"), ("email_field", "mail"), ("role_field", "user.x")),
    ),
}


@pytest.mark.parametrize("case", MAPPING.values(), ids=MAPPING.keys())
async def test_identity_is_mapped_from_the_answer(
    make_provider: ProviderFactory, case: Mapped
) -> None:
    provider = make_provider(case.path, **dict(case.settings))
    identity = await identify(provider, *case.lines)
    assert identity is not None
    assert (identity.user_id, identity.email, identity.role, identity.via_token) == case.expected
    assert len(identity.credential_hash) == 32


NO_CREDENTIALS = {
    "no headers": (),
    "blank cookie and authorization": (("Cookie", "  "), ("Authorization", "")),
    "only the sidecar's own cookie": (("Cookie", f"{SIDECAR_COOKIE}=abc"),),
    "identity headers are not credentials": (
        ("X-Forwarded-User", "u-alice"),
        ("X-Forwarded-Email", "alice@example.com"),
    ),
}


@pytest.mark.parametrize("lines", NO_CREDENTIALS.values(), ids=NO_CREDENTIALS.keys())
async def test_no_credentials_is_anonymous_without_asking(
    make_provider: ProviderFactory, console: StubConsole, lines: tuple[tuple[str, str], ...]
) -> None:
    assert await identify(make_provider(), *lines) is None
    assert console.count() == 0


REFUSED = {
    "401 unknown session": (("Cookie", f"{SESSION_COOKIE}=expired"),),
    "401 unknown token": (("Authorization", "Bearer nope"),),
    "403 forbidden": (("Cookie", f"{SESSION_COOKIE}=forbidden"),),
}


@pytest.mark.parametrize("lines", REFUSED.values(), ids=REFUSED.keys())
async def test_refused_credentials_are_anonymous(
    make_provider: ProviderFactory, console: StubConsole, lines: tuple[tuple[str, str], ...]
) -> None:
    assert await identify(make_provider(), *lines) is None
    assert console.count() == 1


# --- failures ------------------------------------------------------------------------------

UNAVAILABLE = {
    "500": ("/api/me-500", "answered 500"),
    "timeout": ("/api/me-slow", "timed out"),
    "not JSON": ("/api/me-html", "not JSON"),
    "JSON but not an object": ("/api/me-array", "not a JSON object"),
    "200 without the id field": ("/api/me-noid", "no usable 'id' field"),
    "redirect is not followed": ("/api/me-redirect", "answered 302"),
    "answer too large": ("/api/me-huge", "over"),
}


@pytest.mark.parametrize(("path", "reason"), UNAVAILABLE.values(), ids=UNAVAILABLE.keys())
async def test_bad_answers_are_unavailable(
    make_provider: ProviderFactory, console: StubConsole, path: str, reason: str
) -> None:
    provider = make_provider(path, timeout="0.2s")
    with pytest.raises(IdentityUnavailable, match=reason):
        await identify(provider, *ALICE)
    assert console.count("/api/me") == 0  # the redirect was not followed


async def test_connection_refused_is_unavailable(unused_tcp_port: int) -> None:
    config = make_config(f"http://127.0.0.1:{unused_tcp_port}")
    provider = build_identity_provider(config)
    try:
        with pytest.raises(IdentityUnavailable, match="introspection failed"):
            await provider.identify(headers(*ALICE), peer_trusted=False)
    finally:
        await provider.close()


async def test_undecodable_credentials_are_unavailable_without_asking(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    # aiohttp hands header bytes that are not UTF-8 over as lone surrogates.
    with pytest.raises(IdentityUnavailable, match="not valid UTF-8"):
        await identify(make_provider(), ("Cookie", f"{SESSION_COOKIE}=u-alice\udcff"))
    assert console.count() == 0


async def test_missing_id_is_logged_once_without_credentials(
    make_provider: ProviderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    provider = make_provider("/api/me-noid")
    with caplog.at_level(logging.WARNING, logger="sidecar.identity"):
        for _ in range(3):
            with pytest.raises(IdentityUnavailable):
                await identify(provider, *ALICE)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "id_field" in warnings[0].getMessage()
    assert "u-alice" not in caplog.text


# --- cache ---------------------------------------------------------------------------------


async def test_answers_are_cached_until_the_ttl_passes(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    clock = FakeClock()
    provider = make_provider(clock=clock, cache_ttl="30s")
    first = await identify(provider, *ALICE)
    for _ in range(5):
        assert await identify(provider, *ALICE) == first
    clock.now += 29.9
    assert await identify(provider, *ALICE) == first
    assert console.count() == 1

    clock.now += 0.2
    assert await identify(provider, *ALICE) == first
    assert console.count() == 2


async def test_anonymous_answers_are_cached_too(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    clock = FakeClock()
    provider = make_provider(clock=clock)
    lines = (("Cookie", f"{SESSION_COOKIE}=expired"),)
    assert await identify(provider, *lines) is None
    assert await identify(provider, *lines) is None
    assert console.count() == 1
    clock.now += 31
    assert await identify(provider, *lines) is None
    assert console.count() == 2


async def test_zero_ttl_disables_the_cache(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider(cache_ttl=0)
    await identify(provider, *ALICE)
    await identify(provider, *ALICE)
    assert console.count() == 2


async def test_failures_are_not_cached_and_recovery_is_seen_at_once(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider("/api/me-flaky")
    console.down = True
    for _ in range(2):
        with pytest.raises(IdentityUnavailable, match="502"):
            await identify(provider, *ALICE)
    console.down = False
    identity = await identify(provider, *ALICE)
    assert identity is not None
    assert identity.user_id == "u-alice"
    assert await identify(provider, *ALICE) == identity
    assert console.count() == 3


async def test_cache_is_bounded_least_recently_used_first(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider(cache_size=2)
    carol = (("Cookie", f"{SESSION_COOKIE}=u-carol"),)
    await identify(provider, *ALICE)
    await identify(provider, *BOB)
    await identify(provider, *ALICE)  # hit: alice is now the most recently used
    await identify(provider, *carol)  # evicts bob
    assert console.count() == 3
    await identify(provider, *ALICE)
    assert console.count() == 3
    await identify(provider, *BOB)
    assert console.count() == 4


CREDENTIAL_PAIRS = {
    "different sessions": (ALICE, BOB),
    "cookie vs cookie plus token": (ALICE, (*ALICE, *CAROL_TOKEN)),
}


@pytest.mark.parametrize(("one", "other"), CREDENTIAL_PAIRS.values(), ids=CREDENTIAL_PAIRS.keys())
async def test_different_credentials_are_different_entries(
    make_provider: ProviderFactory,
    console: StubConsole,
    one: tuple[tuple[str, str], ...],
    other: tuple[tuple[str, str], ...],
) -> None:
    provider = make_provider()
    first = await identify(provider, *one)
    second = await identify(provider, *other)
    assert console.count() == 2
    if first is not None and second is not None:
        assert first.credential_hash != second.credential_hash


async def test_sidecar_cookie_changes_do_not_change_the_credential(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider()
    before = await identify(provider, ("Cookie", f"{SIDECAR_COOKIE}=one; {SESSION_COOKIE}=u-alice"))
    after = await identify(provider, ("Cookie", f"{SESSION_COOKIE}=u-alice; {SIDECAR_COOKIE}=two"))
    assert before is not None
    assert after is not None
    assert before.credential_hash == after.credential_hash
    assert console.count() == 1


# --- single flight -------------------------------------------------------------------------


async def _start_overlapping(
    provider: IntrospectProvider, console: StubConsole, n: int
) -> list[asyncio.Task[Identity | None]]:
    tasks = [
        asyncio.create_task(provider.identify(headers(*ALICE), peer_trusted=False))
        for _ in range(n)
    ]
    await asyncio.wait_for(console.entered.wait(), 5)
    await asyncio.sleep(0.05)  # every caller has reached the shared introspection
    return tasks


async def test_concurrent_calls_share_one_introspection(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider("/api/me-gated")
    tasks = await _start_overlapping(provider, console, 20)
    console.gate.set()
    results = await asyncio.gather(*tasks)
    assert console.count() == 1
    assert {r.user_id for r in results if r is not None} == {"u-alice"}
    assert all(r is results[0] for r in results)


async def test_a_shared_failure_reaches_every_caller_and_is_not_kept(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider("/api/me-gated")
    console.gated_status = 500
    tasks = await _start_overlapping(provider, console, 20)
    console.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert console.count() == 1
    assert all(isinstance(r, IdentityUnavailable) for r in results)

    console.gated_status = 200
    identity = await identify(provider, *ALICE)
    assert identity is not None
    assert console.count() == 2


async def test_one_caller_going_away_does_not_cancel_the_others(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider("/api/me-gated")
    first, second = await _start_overlapping(provider, console, 2)
    first.cancel()
    await asyncio.sleep(0)
    console.gate.set()
    identity = await second
    assert identity is not None
    assert identity.user_id == "u-alice"
    assert first.cancelled()
    assert console.count() == 1


async def test_close_fails_waiting_callers_closed(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider("/api/me-gated")
    (waiting,) = await _start_overlapping(provider, console, 1)
    await provider.close()
    with pytest.raises(IdentityUnavailable, match="closing"):
        await waiting
    with pytest.raises(IdentityUnavailable, match="closed"):
        await identify(provider, *ALICE)


# --- what the console sees -----------------------------------------------------------------


async def test_only_cookie_and_authorization_are_forwarded(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider()
    await identify(
        provider,
        ("Cookie", f"{SESSION_COOKIE}=u-alice; theme=dark"),
        ("Cookie", f"{SIDECAR_COOKIE}=secret-session; lang=en"),
        ("Authorization", "Bearer tok-carol"),
        ("X-Forwarded-User", "u-admin"),
        ("X-Forwarded-Groups", "admin"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-CSRF-Token", "t"),
        ("User-Agent", "evil/1.0"),
        ("Accept", "text/html"),
        ("Host", "attacker.example"),
    )
    (seen,) = console.received
    assert seen.path == "/api/me"
    # One normalised line: the same one the proxy forwards (see console_cookies).
    assert seen.headers.getall("Cookie") == [f"{SESSION_COOKIE}=u-alice; theme=dark; lang=en"]
    assert seen.headers.getall("Authorization") == ["Bearer tok-carol"]
    assert seen.headers.getall("Accept") == ["application/json"]
    assert seen.headers["Host"] == console.url.removeprefix("http://")
    assert seen.headers.get("User-Agent") != "evil/1.0"
    leaked = {"x-forwarded-user", "x-forwarded-groups", "x-forwarded-for", "x-csrf-token"}
    assert leaked.isdisjoint(name.lower() for name in seen.headers)


async def test_console_cookies_are_not_kept_between_requests(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider()
    await identify(provider, *ALICE)
    assert await identify(provider, ("Authorization", "Bearer nope")) is None
    assert "Cookie" not in console.received[-1].headers


# --- building ------------------------------------------------------------------------------


async def test_build_uses_the_injected_session_and_close_closes_it(
    console: StubConsole,
) -> None:
    sessions: list[aiohttp.ClientSession] = []

    def session_factory() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()))
        return sessions[-1]

    provider = build_identity_provider(make_config(console.url), session_factory)
    assert isinstance(provider, IntrospectProvider)
    assert not sessions  # created lazily, on first use
    identity = await provider.identify(CIMultiDictProxy(headers(*ALICE)), peer_trusted=False)
    assert identity is not None
    await provider.identify(headers(*BOB), peer_trusted=False)
    assert len(sessions) == 1
    await provider.close()
    assert sessions[0].closed


async def test_cookies_split_over_lines_are_the_same_credentials(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    # The console receives one normalised line either way (see console_cookies), so the
    # two spellings are one credential: one introspection, one cache entry.
    provider = make_provider()
    first = await identify(provider, ("Cookie", f"{SESSION_COOKIE}=u-alice; a=b"))
    second = await identify(provider, ("Cookie", f"{SESSION_COOKIE}=u-alice"), ("Cookie", "a=b"))
    assert first == second
    assert console.count() == 1
