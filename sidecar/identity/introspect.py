"""Identity from the console itself: ``GET upstream.url + identity.introspect.path``.

The console is the authority on its own sessions, so the sidecar asks it with the caller's
credentials and nothing else:

* Only the caller's ``Cookie`` and ``Authorization`` lines are sent (every line of each),
  minus the sidecar's own session cookie, which the console has no use for. No other header
  of the caller is forwarded: the console must judge the credentials, not forwarding or
  identity headers a client may have written.
* ``200`` with a JSON object: the user, from ``id_field``, ``email_field``, ``role_field``
  (one key, or a dot path such as ``user.id``). A 200 without a usable id is a
  misconfiguration (wrong field name), not anonymity: :class:`IdentityUnavailable`.
* ``401``/``403``: anonymous. Anything else (3xx, 5xx, timeout, refused connection, a body
  that is not JSON): :class:`IdentityUnavailable`, and the caller fails closed.
* No credentials at all: anonymous at once, without asking.

Answers (users and anonymous) are cached for ``cache_ttl`` under a hash of the credentials,
at most ``cache_size`` entries, least recently used evicted first; failures are never
cached. Concurrent requests with the same credentials share one introspection.

``via_token`` is True only when every credential is a Bearer token and no console cookie
was sent. When both are present the request counts as a browser session: token requests
skip the MFA gate, and a browser holding a console session cookie must not be able to skip
it by adding any ``Authorization: Bearer`` header (the console may well authenticate it by
the cookie and ignore the header).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import Config
from sidecar.config import Introspect as IntrospectSettings
from sidecar.identity.base import (
    Identity,
    IdentityUnavailable,
    bearer_token,
    choose_role,
    console_cookies,
    credential_hash,
    lookup_field,
    string_or_none,
    user_id_from,
)
from sidecar.logs import fields

log = logging.getLogger("sidecar.identity.introspect")

# A /api/me answer is a few hundred bytes; a console that streams more is broken or hostile.
MAX_ANSWER_BYTES: Final = 1024 * 1024


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

    async def identify(self, headers: CIMultiDictProxy[str], peer_trusted: bool) -> Identity | None:
        del peer_trusted  # the console judges credentials, whoever relays them
        if self._closed:
            raise IdentityUnavailable("identity provider is closed")
        cookies = console_cookies(
            headers.getall("Cookie", ()), self._own_cookie, self._settings.cookies or None
        )
        authorizations = [line for line in headers.getall("Authorization", ()) if line.strip()]
        if not cookies and not authorizations:
            return None
        if not _encodable(cookies) or not _encodable(authorizations):
            # Bytes that were not UTF-8 on the way in (aiohttp keeps them as surrogates). How
            # an HTTP client re-encodes them varies (dropped, refused), so the console could
            # judge other credentials than the ones the caller sent: fail closed.
            raise IdentityUnavailable("credentials are not valid UTF-8")

        # The sidecar session binds to this hash too (Identity.credential_hash), which is why
        # the sidecar's own cookie is left out: re-issuing it must not look like a new login.
        key = credential_hash(cookies, authorizations)
        cached = self._cache.get(key)
        if cached is not None:
            expires_at, identity = cached
            if self._clock() < expires_at:
                self._cache.move_to_end(key)
                return identity
            del self._cache[key]

        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._introspect_and_remember(key, cookies, authorizations)
            )
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

    def _default_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            # Never keep or replay cookies the console sets: each request is judged on the
            # caller's own credentials only.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
        )

    async def _introspect_and_remember(
        self, key: bytes, cookies: list[str], authorizations: list[str]
    ) -> Identity | None:
        try:
            identity = await self._introspect(key, cookies, authorizations)
            self._remember(key, identity)
            return identity
        finally:
            self._inflight.pop(key, None)

    def _remember(self, key: bytes, identity: Identity | None) -> None:
        ttl = self._settings.cache_ttl
        if ttl <= 0:
            return
        self._cache[key] = (self._clock() + ttl, identity)
        self._cache.move_to_end(key)
        while len(self._cache) > self._settings.cache_size:
            self._cache.popitem(last=False)

    async def _introspect(
        self, key: bytes, cookies: list[str], authorizations: list[str]
    ) -> Identity | None:
        if self._session is None:
            self._session = self._session_factory()
        request_headers: CIMultiDict[str] = CIMultiDict()
        for line in cookies:
            request_headers.add("Cookie", line)
        for line in authorizations:
            request_headers.add("Authorization", line)
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
            raise IdentityUnavailable(
                f"introspection failed: {type(exc).__name__}: {exc}"
            ) from None
        except ValueError as exc:
            # aiohttp refuses header values it cannot send (control characters). The message
            # is the exception type only: its text could quote the credential.
            raise IdentityUnavailable(
                f"credentials could not be forwarded ({type(exc).__name__})"
            ) from None
        return self._identity_from(body, key, via_token=_via_token(cookies, authorizations))

    def _identity_from(self, body: bytes, key: bytes, *, via_token: bool) -> Identity:
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
        return Identity(
            user_id=user_id,
            email=string_or_none(lookup_field(document, settings.email_field)),
            role=choose_role(lookup_field(document, settings.role_field), self._admin_roles),
            via_token=via_token,
            credential_hash=key,
        )


def _encodable(lines: list[str]) -> bool:
    try:
        for line in lines:
            line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _via_token(cookies: list[str], authorizations: list[str]) -> bool:
    return not cookies and all(bearer_token(line) is not None for line in authorizations)


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
