"""Identity from the console itself: ``GET upstream.url + identity.introspect.path``.

The console is the authority on its own sessions, so the sidecar asks it with the caller's
credentials, in the context the proxied request will carry, and nothing else:

* Credentials: every ``Cookie`` line (one normalised line, exactly as the proxy forwards it,
  without the sidecar's own session cookie, which the console has no use for), every
  ``Authorization`` line, and every line of the extra credential headers in ``headers`` (an
  API key header, say). ``cookies`` names the console's session cookies: they alone bind
  the sidecar's session, but every cookie is shown to the console (a cookie it logs users
  in with, "remember me" say, must never pass as anonymous here and as a user there). A
  credential header the request's ``Connection`` header names is not one: the proxy drops
  it (RFC 9110 §7.6.1), so the console never sees it.
* Context, exactly what the proxy sends (:mod:`sidecar.net.forwarding`): the client's
  ``Host`` line as ``Host`` and ``X-Forwarded-Host``, ``X-Forwarded-Proto``, and
  ``X-Forwarded-For`` with the resolved client address. A console that ties a session to a
  host, a scheme or an address therefore answers introspection as it will answer the request.
* ``User-Agent``, for consoles that tie a session to the browser. No other header of the
  caller is forwarded: the console must judge the credentials, not identity headers a client
  may have written.
* ``200`` with a JSON object: the user, from ``id_field``, ``email_field``, ``role_field``
  (one key, or a dot path such as ``user.id``). A 200 without a usable id is a
  misconfiguration (wrong field name), not anonymity: :class:`IdentityUnavailable`.
* ``401``/``403``: anonymous. Anything else (3xx, 5xx, timeout, refused connection, a body
  that is not JSON, answer headers over the proxy's limits): :class:`IdentityUnavailable`,
  and the caller fails closed. The reason names the failure's kind and the console's status,
  never an aiohttp message (those can quote the request's headers or the answer's bytes).
* No credentials at all: anonymous at once, without asking.

Users are cached for ``cache_ttl``, at most ``cache_size`` entries, least recently used
evicted first. "Anonymous" and failures are never cached: a console that keeps its session
id across a login would otherwise see the first requests after the login judged anonymous
(past the MFA gate) for as long as the answer lived. The cache key covers everything that
was sent (every credential, the user agent and the whole forwarding context), so an answer
is never reused for a request the console could answer differently. Concurrent requests with
the same key share one introspection.

The session binding (``Identity.credential_hash``) covers the credentials only: not the
client address (users roam between networks; a verification survives it) and not the host
(the sidecar's cookie is scoped to a host by the browser already, and the console decides
per host which user the credentials are; the session is for that user only).

``bearer_only`` is True only when every credential is a Bearer token: no console cookie
(one of ``cookies`` when that is set) and no extra credential header. When both are present
the request counts as a browser session: a browser holding a console session cookie must
not be able to pass as an API client by adding any ``Authorization: Bearer`` header (the
console may well authenticate it by the cookie and ignore the header). An extra credential
header is not a Bearer token either: such requests meet the MFA gate like browser sessions.

``api_token`` (the request skips the MFA gate) needs more than that shape: a browser's own
session token sent as ``Authorization: Bearer`` is bearer-only too. With
``identity.introspect.api_token: {field, value}`` the console says which kind of credential
it accepted: a bearer-only request is an API token when the answer's ``field`` (a key or a
dot path) is ``value`` or a list holding it (:func:`~sidecar.identity.base.marks_api_token`).
A missing field, another value or a non-string is no API token. Without the setting, no
request is one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Config
from sidecar.config import Introspect as IntrospectSettings
from sidecar.http_fields import UPSTREAM_MAX_FIELD, UPSTREAM_MAX_HEADERS, connection_tokens
from sidecar.identity.base import (
    Identity,
    IdentityUnavailable,
    bearer_token,
    choose_role,
    console_cookies,
    credential_hash,
    lookup_field,
    marks_api_token,
    string_or_none,
    user_id_from,
)
from sidecar.logs import describe_error, fields
from sidecar.net.forwarding import Forwarding

log = logging.getLogger("sidecar.identity.introspect")

# A /api/me answer is a few hundred bytes; a console that streams more is broken or hostile.
MAX_ANSWER_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Question:
    """Everything one introspection sends, and the two hashes derived from it."""

    cookies: list[str]  # every console cookie: what the proxy forwards
    named_cookies: list[str]  # the ones in identity.introspect.cookies (all when unset)
    authorizations: list[str]
    extras: list[tuple[str, str]]  # (configured name, value), every line
    user_agent: str | None
    forwarding: Forwarding
    #: Cache and single-flight key: every credential and the whole forwarding context.
    key: bytes
    #: Identity.credential_hash: the credentials only.
    binding: bytes

    @property
    def bearer_only(self) -> bool:
        return (
            not self.named_cookies
            and not self.extras
            and all(bearer_token(line) is not None for line in self.authorizations)
        )


class IntrospectProvider:
    """Asks the console who the caller is; see the module docstring for the promises."""

    def __init__(
        self,
        *,
        url: str,
        settings: IntrospectSettings,
        admin_roles: Sequence[str],
        own_cookie: str | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._settings = settings
        self._admin_roles = tuple(admin_roles)
        self._own_cookie = own_cookie
        self._session_factory = session_factory or self._default_session
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._cache: OrderedDict[bytes, tuple[float, Identity | None]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Identity | None]] = {}
        self._warned_unusable = False
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> IntrospectProvider:
        settings = config.identity.introspect
        return cls(
            url=config.upstream.url + settings.path,
            settings=settings,
            admin_roles=config.identity.admin_roles,
            own_cookie=config.mfa.session.cookie_name,
            session_factory=session_factory,
            clock=clock,
        )

    async def identify(
        self, headers: CIMultiDictProxy[str], peer_trusted: bool, forwarding: Forwarding
    ) -> Identity | None:
        del peer_trusted  # the console judges credentials, whoever relays them
        if self._closed:
            raise IdentityUnavailable("identity provider is closed")
        question = self._question(headers, forwarding)
        if question is None:
            return None

        key = question.key
        cached = self._cache.get(key)
        if cached is not None:
            expires_at, identity = cached
            if self._clock() < expires_at:
                self._cache.move_to_end(key)
                return identity
            del self._cache[key]

        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._introspect_and_remember(question))
            task.add_done_callback(_consume_exception)
            self._inflight[key] = task
        # Shielded: one caller going away (client disconnect) must not cancel the answer the
        # other callers with the same credentials are waiting for.
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # The shared introspection was cancelled by close(), not this caller.
                raise IdentityUnavailable("identity provider is closing") from None
            raise

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._cache.clear()

    # --- internals -------------------------------------------------------------------------

    def _question(self, headers: CIMultiDictProxy[str], forwarding: Forwarding) -> _Question | None:
        """What to ask the console for these request headers; None: no credentials."""
        # Every cookie the proxy will forward is shown to the console (a "remember me" cookie
        # the console logs users in with must not pass as anonymous here and as a user
        # there); the named ones alone bind the sidecar's session.
        cookie_lines = headers.getall("Cookie", ())
        cookies = console_cookies(cookie_lines, self._own_cookie)
        named = (
            console_cookies(cookie_lines, self._own_cookie, self._settings.cookies)
            if self._settings.cookies
            else cookies
        )
        user_agent = headers.get("User-Agent")
        authorizations = [line for line in headers.getall("Authorization", ()) if line.strip()]
        # The proxy drops what Connection names: such a header never reaches the console.
        hop_by_hop = connection_tokens(headers.getall("Connection", ()))
        extras = [
            (name, line)
            for name in self._settings.headers
            if name.lower() not in hop_by_hop
            for line in headers.getall(name, ())
            if line.strip()
        ]
        if not cookies and not authorizations and not extras:
            return None
        extra_lines = [f"{name.lower()}: {value}" for name, value in extras]
        host = [forwarding.host] if forwarding.host else []
        agent = [user_agent] if user_agent else []
        if not _encodable([*cookies, *authorizations, *extra_lines, *host, *agent]):
            # Bytes that were not UTF-8 on the way in (aiohttp keeps them as surrogates). How
            # an HTTP client re-encodes them varies (dropped, refused), so the console could
            # judge other credentials than the ones the caller sent: fail closed.
            raise IdentityUnavailable("credentials or Host are not valid UTF-8")
        client_ip = [forwarding.client_ip] if forwarding.client_ip else []
        # The binding leaves the sidecar's own cookie out (console_cookies): re-issuing it
        # must not look like a new login. Without extra headers it is the hash of cookies and
        # authorizations alone, as before extra headers existed: upgrading keeps sessions.
        binding_groups = [named, authorizations] + ([extra_lines] if extra_lines else [])
        return _Question(
            cookies=cookies,
            named_cookies=named,
            authorizations=authorizations,
            extras=extras,
            user_agent=user_agent,
            forwarding=forwarding,
            key=credential_hash(
                cookies, authorizations, extra_lines, host, [forwarding.proto], client_ip, agent
            ),
            binding=credential_hash(*binding_groups),
        )

    def _default_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            # Never keep or replay cookies the console sets: each request is judged on the
            # caller's own credentials only.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            # The proxy's limits: an answer the proxy relays (a large Set-Cookie on /api/me,
            # many headers) must not make introspection fail.
            max_line_size=UPSTREAM_MAX_FIELD,
            max_field_size=UPSTREAM_MAX_FIELD,
            max_headers=UPSTREAM_MAX_HEADERS,
        )

    async def _introspect_and_remember(self, question: _Question) -> Identity | None:
        try:
            identity = await self._introspect(question)
            self._remember(question.key, identity)
            return identity
        finally:
            self._inflight.pop(question.key, None)

    def _remember(self, key: bytes, identity: Identity | None) -> None:
        ttl = self._settings.cache_ttl
        if ttl <= 0 or identity is None:
            # "Anonymous" is never reused: a console that keeps the session id across a login
            # would otherwise have the first requests after the login judged anonymous (no
            # MFA) for as long as the answer was cached.
            return
        self._cache[key] = (self._clock() + ttl, identity)
        self._cache.move_to_end(key)
        while len(self._cache) > self._settings.cache_size:
            self._cache.popitem(last=False)

    async def _introspect(self, question: _Question) -> Identity | None:
        if self._session is None:
            self._session = self._session_factory()
        request_headers: CIMultiDict[str] = CIMultiDict()
        if question.forwarding.host:
            # The Host line the proxy passes on with the request itself.
            request_headers["Host"] = question.forwarding.host
        for line in question.cookies:
            request_headers.add("Cookie", line)
        for line in question.authorizations:
            request_headers.add("Authorization", line)
        for name, value in question.extras:
            request_headers.add(name, value)
        if question.user_agent:
            # A console that ties a session to the browser sees the browser here too.
            request_headers["User-Agent"] = question.user_agent
        for name, value in question.forwarding.header_lines():
            request_headers[name] = value
        request_headers["Accept"] = "application/json"

        timeout = self._settings.timeout
        try:
            async with asyncio.timeout(timeout):
                async with self._session.get(
                    self._url, headers=request_headers, allow_redirects=False
                ) as response:
                    status = response.status
                    if status in (401, 403):
                        return None
                    if status != 200:
                        raise IdentityUnavailable(f"introspection answered {status}")
                    body = await _read_limited(response)
        except TimeoutError:
            raise IdentityUnavailable(f"introspection timed out after {timeout:g}s") from None
        except aiohttp.ClientError as exc:
            # Never str(exc): it can quote the answer's header bytes (a Set-Cookie line).
            raise IdentityUnavailable(f"introspection failed: {describe_error(exc)}") from None
        except ValueError as exc:
            # aiohttp refuses header values it cannot send (control characters). The message
            # is the exception type only: its text could quote the credential.
            raise IdentityUnavailable(
                f"credentials could not be forwarded ({type(exc).__name__})"
            ) from None
        return self._identity_from(body, question)

    def _identity_from(self, body: bytes, question: _Question) -> Identity:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise IdentityUnavailable("introspection answer is not JSON") from None
        if not isinstance(document, dict):
            raise IdentityUnavailable("introspection answer is not a JSON object")
        settings = self._settings
        user_id = user_id_from(lookup_field(document, settings.id_field))
        if user_id is None:
            if not self._warned_unusable:
                self._warned_unusable = True
                log.warning(
                    "introspection answered 200 without a usable user id; check "
                    "identity.introspect.id_field (logged once)",
                    extra=fields(id_field=settings.id_field, answer_keys=sorted(document)[:20]),
                )
            raise IdentityUnavailable(
                f"introspection answer has no usable {settings.id_field!r} field"
            )
        rule = settings.api_token
        return Identity(
            user_id=user_id,
            email=string_or_none(lookup_field(document, settings.email_field)),
            role=choose_role(lookup_field(document, settings.role_field), self._admin_roles),
            bearer_only=question.bearer_only,
            api_token=question.bearer_only
            and rule is not None
            and marks_api_token(lookup_field(document, rule.field), rule.value),
            credential_hash=question.binding,
        )


def _encodable(lines: list[str]) -> bool:
    try:
        for line in lines:
            line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise IdentityUnavailable(f"introspection answer is over {MAX_ANSWER_BYTES} bytes")
    return bytes(body)


def _consume_exception(task: asyncio.Task[Identity | None]) -> None:
    # When every waiter went away, nobody retrieves the failure; asyncio would then log
    # "exception was never retrieved" for an outcome that is normal here.
    if not task.cancelled():
        task.exception()
