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

from sidecar.http_fields import UPSTREAM_MAX_FIELD
from sidecar.identity import Identity, IdentityUnavailable, build_identity_provider
from sidecar.identity.introspect import IntrospectProvider
from sidecar.net.forwarding import Forwarding
from tests.identity.stub_console import (
    API_KEY_HEADER,
    FORWARDING,
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
    return await provider.identify(headers(*lines), peer_trusted=False, forwarding=FORWARDING)


# --- mapping -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapped:
    lines: tuple[tuple[str, str], ...]
    expected: tuple[str, str | None, str | None, bool]  # user_id, email, role, bearer_only
    path: str = "/api/me"
    settings: tuple[tuple[str, str], ...] = ()


MAPPING = {
    "session cookie": Mapped(ALICE, ("u-alice", "alice@example.com", "owner", False)),
    "bearer token is bearer-only": Mapped(
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
    assert (identity.user_id, identity.email, identity.role, identity.bearer_only) == case.expected
    assert not identity.api_token  # no identity.introspect.api_token configured
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
            await provider.identify(headers(*ALICE), peer_trusted=False, forwarding=FORWARDING)
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


async def test_anonymous_answers_are_never_cached(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    """A console that keeps the session id across a login: the cookie that was anonymous a
    moment ago names a user now, and the very next request must be judged as that user."""
    clock = FakeClock()
    provider = make_provider(clock=clock)
    lines = (("Cookie", f"{SESSION_COOKIE}=expired"),)
    assert await identify(provider, *lines) is None
    assert await identify(provider, *lines) is None
    assert console.count() == 2
    login = (("Cookie", f"{SESSION_COOKIE}=u-alice"),)
    assert await identify(provider, *login) is not None


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
        asyncio.create_task(provider.identify(headers(*ALICE), False, FORWARDING)) for _ in range(n)
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


async def test_the_console_gets_the_credentials_and_the_forwarding_context_only(
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
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "http"),
        ("Forwarded", "for=10.0.0.1;host=evil.example"),
        ("X-CSRF-Token", "t"),
        (API_KEY_HEADER, "key-dave"),  # not configured: not a credential
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
    # The context the proxy will send with the request itself, never the client's own
    # forwarding headers.
    assert seen.headers.getall("Host") == [FORWARDING.host]
    assert seen.headers.getall("X-Forwarded-Host") == [FORWARDING.host]
    assert seen.headers.getall("X-Forwarded-Proto") == [FORWARDING.proto]
    assert seen.headers.getall("X-Forwarded-For") == [FORWARDING.client_ip]
    # The browser, for consoles that tie a session to it (what the console will see).
    assert seen.headers.getall("User-Agent") == ["evil/1.0"]
    leaked = {"x-forwarded-user", "x-forwarded-groups", "forwarded", "x-csrf-token", "x-api-key"}
    assert leaked.isdisjoint(name.lower() for name in seen.headers)


async def test_without_a_host_line_the_console_gets_its_own_host(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    # HTTP/1.0 requests may come without Host; the proxy then lets aiohttp name the upstream.
    await make_provider().identify(
        headers(*ALICE), False, Forwarding(client_ip=None, proto="http", host=None)
    )
    (seen,) = console.received
    assert seen.headers.getall("Host") == [console.url.removeprefix("http://")]
    assert "X-Forwarded-Host" not in seen.headers
    assert "X-Forwarded-For" not in seen.headers
    assert seen.headers.getall("X-Forwarded-Proto") == ["http"]


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
    identity = await provider.identify(
        CIMultiDictProxy(headers(*ALICE)), peer_trusted=False, forwarding=FORWARDING
    )
    assert identity is not None
    await provider.identify(headers(*BOB), peer_trusted=False, forwarding=FORWARDING)
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


# --- answer header limits, and what a failure logs -----------------------------------------


async def test_a_large_set_cookie_on_the_answer_still_identifies(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    # Over aiohttp's 8 KiB client default, under the proxy's limit: the proxy relays such an
    # answer, so introspection must read it too (it used to answer 503).
    console.set_cookie = "big=" + "x" * 20_000 + "; Path=/"
    identity = await identify(make_provider("/api/me-set-cookie"), *ALICE)
    assert identity is not None
    assert identity.user_id == "u-alice"


async def test_answer_headers_over_the_limit_fail_closed_without_quoting_them(
    make_provider: ProviderFactory,
    console: StubConsole,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiohttp's parser error quotes the start of the offending line: the answer's cookie.
    console.set_cookie = "SECRET-ANSWER-COOKIE=" + "x" * (UPSTREAM_MAX_FIELD + 10)
    provider = make_provider("/api/me-set-cookie")
    with caplog.at_level(logging.DEBUG), pytest.raises(IdentityUnavailable) as failed:
        await identify(provider, ("Cookie", f"{SESSION_COOKIE}=u-alice-SECRET-REQUEST"))
    reason = str(failed.value)
    assert reason.startswith("introspection failed: ")
    assert "SECRET" not in reason
    assert "SECRET" not in caplog.text


# --- the console answers in the context the request will be forwarded in -------------------

HOST_A = Forwarding(client_ip="192.0.2.10", proto="https", host="a.example")
HOST_B = Forwarding(client_ip="192.0.2.10", proto="https", host="b.example")
ADDRESS_B = Forwarding(client_ip="198.51.100.7", proto="https", host="a.example")
PLAIN_HTTP = Forwarding(client_ip="192.0.2.10", proto="http", host="a.example")


@dataclass(frozen=True)
class Bound:
    """A console that knows alice only in one context (``bound`` headers), not in ``other``."""

    bound: tuple[tuple[str, str], ...]
    other: Forwarding


CONTEXT_BOUND = {
    "host-scoped console (X-Forwarded-Host)": Bound((("X-Forwarded-Host", "a.example"),), HOST_B),
    "host-scoped console (Host)": Bound((("Host", "a.example"),), HOST_B),
    "address-bound console": Bound((("X-Forwarded-For", "192.0.2.10"),), ADDRESS_B),
    "https-only console": Bound((("X-Forwarded-Proto", "https"),), PLAIN_HTTP),
}


@pytest.mark.parametrize("bound_first", [True, False], ids=["bound first", "other first"])
@pytest.mark.parametrize("case", CONTEXT_BOUND.values(), ids=CONTEXT_BOUND.keys())
async def test_an_answer_is_never_reused_for_another_context(
    make_provider: ProviderFactory, console: StubConsole, case: Bound, bound_first: bool
) -> None:
    console.bound = dict(case.bound)
    provider = make_provider("/api/me-bound")
    order = [HOST_A, case.other] if bound_first else [case.other, HOST_A]
    for _ in range(3):
        for forwarding in order:
            identity = await provider.identify(headers(*ALICE), False, forwarding)
            if forwarding is HOST_A:
                assert identity is not None
                assert identity.user_id == "u-alice"
            else:
                assert identity is None, "the console's answer for another context was reused"
    # The user's answer is asked once, then cached; "anonymous" is asked every time.
    assert console.count() == 4


BINDING_CONTEXTS = {
    "another client address": ADDRESS_B,
    "another host": HOST_B,
    "another scheme": PLAIN_HTTP,
}


@pytest.mark.parametrize("other", BINDING_CONTEXTS.values(), ids=BINDING_CONTEXTS.keys())
async def test_the_session_binding_is_the_credentials_not_the_context(
    make_provider: ProviderFactory, console: StubConsole, other: Forwarding
) -> None:
    # A user who roams to another network (or reaches the console under another name)
    # keeps their verification as long as the console says they are the same user.
    provider = make_provider()
    here = await provider.identify(headers(*ALICE), False, HOST_A)
    there = await provider.identify(headers(*ALICE), False, other)
    assert here is not None
    assert there is not None
    assert here.credential_hash == there.credential_hash
    assert console.count() == 2


async def test_a_host_that_is_not_utf8_fails_closed_without_asking(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    odd_host = Forwarding(client_ip="192.0.2.10", proto="https", host="a.example\udcff")
    with pytest.raises(IdentityUnavailable, match="not valid UTF-8"):
        await make_provider().identify(headers(*ALICE), False, odd_host)
    assert console.count() == 0


# --- extra credential headers (identity.introspect.headers) --------------------------------

DAVE_KEY = ((API_KEY_HEADER, "key-dave"),)


async def test_a_request_with_only_an_extra_credential_header_is_introspected(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    identity = await identify(make_provider(headers=[API_KEY_HEADER]), *DAVE_KEY)
    assert identity is not None
    # Not a Bearer token: the MFA gate applies to it as to a browser session.
    assert (identity.user_id, identity.bearer_only) == ("u-dave", False)
    (seen,) = console.received
    assert seen.headers.getall(API_KEY_HEADER) == ["key-dave"]
    assert "Cookie" not in seen.headers
    assert "Authorization" not in seen.headers


async def test_an_unconfigured_credential_header_is_not_a_credential(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    assert await identify(make_provider(), *DAVE_KEY) is None
    assert console.count() == 0


async def test_extra_credential_headers_match_by_name_whatever_the_case(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    identity = await identify(make_provider(headers=["x-API-key"]), ("X-API-KEY", "key-dave"))
    assert identity is not None
    assert identity.user_id == "u-dave"


async def test_every_line_of_an_extra_credential_header_is_sent_in_order(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider(headers=[API_KEY_HEADER])
    await identify(provider, (API_KEY_HEADER, "nope"), (API_KEY_HEADER, " "), *DAVE_KEY)
    (seen,) = console.received
    assert seen.headers.getall(API_KEY_HEADER) == ["nope", "key-dave"]


async def test_a_credential_header_named_in_connection_is_not_a_credential(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    # The proxy drops what Connection names (RFC 9110 §7.6.1): the console will never see
    # this key, so introspection must not judge it either.
    provider = make_provider(headers=[API_KEY_HEADER])
    lines = (*DAVE_KEY, ("Connection", "keep-alive, x-api-key"))
    assert await identify(provider, *lines) is None
    assert console.count() == 0
    identity = await identify(provider, *ALICE, *lines)
    assert identity is not None
    assert identity.user_id == "u-alice"
    assert API_KEY_HEADER not in console.received[-1].headers


async def test_extra_credential_headers_bind_the_session(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider(headers=[API_KEY_HEADER])
    hashes = set()
    for lines in (
        ALICE,
        (*ALICE, (API_KEY_HEADER, "key-erin")),
        (*ALICE, (API_KEY_HEADER, "key-dave")),
        DAVE_KEY,
        ((API_KEY_HEADER, "key-dave"), (API_KEY_HEADER, "key-dave")),
    ):
        identity = await identify(provider, *lines)
        assert identity is not None
        hashes.add(identity.credential_hash)
    assert len(hashes) == 5
    assert console.count() == 5


async def test_configuring_extra_headers_keeps_the_binding_of_requests_without_them(
    make_provider: ProviderFactory,
) -> None:
    # Adding identity.introspect.headers must not end every verified session.
    before = await identify(make_provider(), *ALICE)
    after = await identify(make_provider(headers=[API_KEY_HEADER]), *ALICE)
    assert before is not None
    assert after is not None
    assert before.credential_hash == after.credential_hash


async def test_an_extra_credential_that_is_not_utf8_fails_closed_without_asking(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider(headers=[API_KEY_HEADER])
    with pytest.raises(IdentityUnavailable, match="not valid UTF-8"):
        await identify(provider, (API_KEY_HEADER, "key-dave\udcff"))
    assert console.count() == 0


async def test_a_bearer_token_with_an_extra_credential_header_is_not_an_api_client(
    make_provider: ProviderFactory,
) -> None:
    # The console may authenticate by the key and ignore the token: the MFA gate applies.
    provider = make_provider(headers=[API_KEY_HEADER])
    identity = await identify(provider, *CAROL_TOKEN, (API_KEY_HEADER, "key-erin"))
    assert identity is not None
    assert not identity.bearer_only


# --- API tokens: identity.introspect.api_token ----------------------------------------------

ALICE_SESSION_AS_BEARER = (("Authorization", "Bearer u-alice"),)
API_RULE = {"field": "credential", "value": "api_token"}


@dataclass(frozen=True)
class ApiCase:
    lines: tuple[tuple[str, str], ...]
    rule: dict[str, str] | None
    api_token: bool


API_CASES = {
    "the console marks it an API token": ApiCase(CAROL_TOKEN, API_RULE, True),
    "nested path": ApiCase(CAROL_TOKEN, {"field": "auth.kind", "value": "api_token"}, True),
    "a list holding the value": ApiCase(
        CAROL_TOKEN, {"field": "auth.kinds", "value": "api_token"}, True
    ),
    "no rule: no API token": ApiCase(CAROL_TOKEN, None, False),
    "the browser's session token as a bearer token": ApiCase(
        ALICE_SESSION_AS_BEARER, API_RULE, False
    ),
    "missing field": ApiCase(CAROL_TOKEN, {"field": "token_kind", "value": "api_token"}, False),
    "missing nested field": ApiCase(
        CAROL_TOKEN, {"field": "auth.kind.name", "value": "api_token"}, False
    ),
    "wrong value": ApiCase(CAROL_TOKEN, {"field": "credential", "value": "api"}, False),
    "value compared exactly": ApiCase(
        CAROL_TOKEN, {"field": "credential", "value": "API_TOKEN"}, False
    ),
    "non-string field": ApiCase(CAROL_TOKEN, {"field": "auth.api", "value": "true"}, False),
    "an object is no value": ApiCase(CAROL_TOKEN, {"field": "auth", "value": "api_token"}, False),
    "a console cookie next to the API token": ApiCase((*ALICE, *CAROL_TOKEN), API_RULE, False),
    "an extra credential header next to the API token": ApiCase(
        (*CAROL_TOKEN, (API_KEY_HEADER, "key-erin")), API_RULE, False
    ),
    "a second, non-Bearer Authorization line": ApiCase(
        (*CAROL_TOKEN, ("Authorization", "Basic dTpw")), API_RULE, False
    ),
}


@pytest.mark.parametrize("case", API_CASES.values(), ids=API_CASES.keys())
async def test_api_tokens_are_what_the_console_marks_on_bearer_only_requests(
    make_provider: ProviderFactory, case: ApiCase
) -> None:
    provider = make_provider(headers=[API_KEY_HEADER], api_token=case.rule)
    identity = await identify(provider, *case.lines)
    assert identity is not None
    assert identity.api_token is case.api_token


async def test_a_cached_answer_keeps_its_api_token_verdict_per_credential(
    make_provider: ProviderFactory, console: StubConsole
) -> None:
    provider = make_provider(api_token=API_RULE)
    for _ in range(2):
        token = await identify(provider, *CAROL_TOKEN)
        browser = await identify(provider, *ALICE, *CAROL_TOKEN)
        assert token is not None
        assert browser is not None
        assert (token.api_token, browser.api_token) == (True, False)
    assert console.count() == 2
