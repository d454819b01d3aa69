"""Forwarding to the upstream console: HTTP streamed both ways, and WebSockets.

This module owns the last pipeline stage (DESIGN step 6). Its promises:

- The upstream URL comes from config only; the request's ``Host`` or an absolute-form target
  never choose where the request goes or what ``X-Forwarded-Host`` says.
- Bodies stream in both directions in bounded memory; a request body over
  ``listen.max_body_size`` is refused with 413 (counted here, because aiohttp's
  ``client_max_size`` does not cover streamed reads), and one that sends no byte for
  ``listen.body_timeout`` is cut off (408 when nothing was answered yet).
- Hop-by-hop headers, including the ones a ``Connection`` header names, are removed in both
  directions (RFC 9110 §7.6.1). Client-sent forwarding headers are replaced by the sidecar's.
- Upstream failures map to 502 (cannot connect or broken answer) and 504 (timeout). A body
  cut off upstream after the status line was sent aborts the client connection, so the
  client sees a broken response rather than a clean, shorter one.
- **No client can hold the upstream for everyone**: HTTP requests share
  ``upstream.max_connections`` connections and wait at most ``upstream.pool_timeout`` for
  one; one client (an IPv4 address or an IPv6 /64, after client-IP resolution) has at most
  ``upstream.max_requests_per_client`` of them at once. WebSockets never take those
  connections: at most ``upstream.max_websockets`` are relayed, at most
  ``upstream.max_websockets_per_client`` for one client. Beyond any of these the answer is
  503 with ``Retry-After`` (decision ``upstream_error``, counted by kind: ``pool``,
  ``per_client``, ``websockets``). A client that stops reading its answer is cut off by the
  listener (``listen.send_timeout``), which frees the upstream connection it held.
- WebSockets are relayed without compression on either leg (permessage-deflate is neither
  offered nor accepted, and a frame marked compressed is a protocol error, never inflated),
  and a message over ``upstream.websocket_max_message`` in either direction closes the
  relay with 1009; aiohttp refuses it from the frame header, before buffering the payload.
- Each relayed WebSocket is kept with what it was admitted on (:class:`Admission`), so that
  it can be judged again while it is open (``sidecar.websocket_review``) and ended with a
  close code of the sidecar's choosing (:meth:`RelayedWebSocket.end`).

The hop to the upstream sits behind :class:`UpstreamTransport` so that a leaner transport can
replace aiohttp's ``ClientSession`` (most of the per-request CPU) without touching the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.config import Config
from sidecar.decision import Decision
from sidecar.http_fields import (
    CLIENT_FORWARDING,
    HOP_BY_HOP,
    LOOKALIKE_IDENTITY,
    NEVER_HOP_BY_HOP,
    UPSTREAM_MAX_FIELD,
    UPSTREAM_MAX_HEADERS,
)
from sidecar.http_fields import connection_tokens as _connection_tokens_of
from sidecar.identity.base import Identity, console_cookies
from sidecar.live import LiveSettings
from sidecar.logs import describe_error as _describe
from sidecar.metrics import Metrics
from sidecar.mfa.session import SessionView
from sidecar.net import ClientKey, IpAddress, client_key
from sidecar.paths import is_under, may_reach_prefix
from sidecar.state import (
    CLIENT_IP,
    DECISION,
    FORWARDING,
    IDENTITY,
    MFA_SESSION,
    PEER_TRUSTED,
    REASON,
    UPSTREAM_STATUS,
)

log = logging.getLogger("sidecar.proxy")

# The field-name sets (hop-by-hop, forwarding, identity look-alikes) and the header limits
# live in sidecar.http_fields: introspection and config validation use them too.

# Generated afresh by aiohttp's WebSocket client for the upstream handshake.
WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)

VIA = "1.1 sidecar"


#: The metrics label of an :class:`UpstreamError` (``sidecar.metrics.UPSTREAM_ERROR_KINDS``).
UpstreamErrorKind = Literal["connect", "timeout", "protocol", "pool", "websockets", "per_client"]
#: Kinds that mean "no capacity left for this request now": 503 with Retry-After.
BUSY: frozenset[UpstreamErrorKind] = frozenset({"pool", "websockets", "per_client"})
#: Seconds a client is asked to wait after a busy answer.
BUSY_RETRY_AFTER = 5


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer properly, or there is no capacity
    left for the request (kinds in :data:`BUSY`)."""

    def __init__(self, kind: UpstreamErrorKind, detail: str) -> None:
        super().__init__(detail)
        self.kind: UpstreamErrorKind = kind


class UpstreamResponse(Protocol):
    """What the proxy needs of an upstream answer."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]

    def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamError if it breaks off."""
        ...


class UpstreamTransport(Protocol):
    """The hop to the upstream; one instance per app, pooled keep-alive connections."""

    def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        """One exchange, holding one of ``upstream.max_connections`` until the context
        exits; raises UpstreamError ``pool`` when none is free within
        ``upstream.pool_timeout``."""
        ...

    def websocket(
        self, target: str, headers: CIMultiDict[str], protocols: tuple[str, ...]
    ) -> AbstractAsyncContextManager[aiohttp.ClientWebSocketResponse]:
        """One WebSocket, counted against ``upstream.max_websockets`` (never against
        ``max_connections``) until the context exits; raises UpstreamError ``websockets``
        beyond it."""
        ...

    async def probe(self) -> bool:
        """True when the upstream answers HTTP at all (for /readyz)."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _AiohttpResponse:
    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    _response: aiohttp.ClientResponse

    async def iter_body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamError("protocol", f"upstream body broke off: {_describe(exc)}") from exc
        except TimeoutError as exc:
            raise UpstreamError("timeout", "upstream body read timed out") from exc


class _StrictConnector(aiohttp.TCPConnector):
    """A pool that never hands out a connection with unread bytes on it.

    An upstream that sends something after a complete response (a stray second response,
    say) would otherwise have those bytes read as the answer to the next request, which may
    be another user's. nginx likewise drops such keep-alive connections. (Overrides
    aiohttp's private ``_get``; covered by a test, aiohttp is pinned below 4.)
    """

    async def _get(self, key: Any, traces: Any) -> Any:
        while True:
            connection = await super()._get(key, traces)
            if connection is None:
                return None
            protocol = connection.protocol
            if protocol is None or not protocol.should_close:
                return connection
            connection.close()


class AiohttpUpstream:
    """:class:`UpstreamTransport` over one aiohttp ``ClientSession``.

    Configured as a proxy must be (NOTES "aiohttp as a proxy"): no cookie jar (the default
    jar would replay one user's ``Set-Cookie`` to the next caller), no decompression, no
    redirects followed, no automatic headers, no proxy settings taken from the environment,
    no overall timeout (it would kill long downloads): connect and per-read timeouts only.

    The pool limits are this class's own, not the connector's: aiohttp queues a request for
    a pooled connection inside ``ClientTimeout.connect``, together with name resolution and
    connecting, and without any deadline when that is unset (as it was), so a full pool held
    every other request for ever; and a timeout there cannot tell "pool full" (503, try
    again) from "console not answering" (504). Here an HTTP request takes one of
    ``max_connections`` slots, waiting at most ``pool_timeout``; WebSockets are counted apart
    (``max_websockets``), so open WebSockets never take a slot a page load needs. The
    connector itself is unlimited: nothing waits inside aiohttp, and the readiness probe is
    never queued behind requests.
    """

    def __init__(self, config: Config) -> None:
        upstream = config.upstream
        self._base = upstream.url
        self._pool = asyncio.Semaphore(upstream.max_connections)
        self._pool_timeout = upstream.pool_timeout
        self._max_websockets = upstream.max_websockets
        #: HTTP requests holding a pool slot, and WebSockets connecting or open, now.
        self.requests = 0
        self.websockets = 0
        connector = _StrictConnector(
            limit=0,
            limit_per_host=0,
            ttl_dns_cache=10,
            keepalive_timeout=upstream.keepalive_timeout,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                # Name resolution and connecting as a whole, and the socket alone.
                connect=upstream.connect_timeout,
                sock_connect=upstream.connect_timeout,
                sock_read=upstream.read_timeout,
            ),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            max_line_size=UPSTREAM_MAX_FIELD,
            max_field_size=UPSTREAM_MAX_FIELD,
            max_headers=UPSTREAM_MAX_HEADERS,
        )
        self._max_message = config.upstream.websocket_max_message

    async def _take_pool_slot(self) -> None:
        if not self._pool.locked():
            await self._pool.acquire()  # a free slot: taken without waiting
            return
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._pool.acquire()
        except TimeoutError:
            raise UpstreamError(
                "pool",
                f"no upstream connection free within {self._pool_timeout:g}s "
                "(all upstream.max_connections in use)",
            ) from None

    def _url(self, target: str) -> URL:
        # target is a server-parsed origin-form path (always starting with "/"), appended to
        # the configured base: nothing in the request can change scheme, host or port.
        return URL(self._base + target, encoded=True)

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
    ) -> AsyncIterator[UpstreamResponse]:
        await self._take_pool_slot()
        self.requests += 1
        try:
            try:
                response = await self._session.request(
                    method,
                    self._url(target),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                )
            except TimeoutError as exc:
                raise UpstreamError("timeout", "upstream did not answer in time") from exc
            except aiohttp.ClientConnectorError as exc:
                raise UpstreamError(
                    "connect", f"cannot connect to upstream: {exc.os_error}"
                ) from exc
            except aiohttp.ClientError as exc:
                raise UpstreamError(
                    "protocol", f"upstream request failed: {_describe(exc)}"
                ) from exc
            try:
                yield _AiohttpResponse(response.status, response.reason, response.headers, response)
            finally:
                response.release()  # back to the pool, or closed when not read to its end
        finally:
            self.requests -= 1
            self._pool.release()

    @contextlib.asynccontextmanager
    async def websocket(
        self, target: str, headers: CIMultiDict[str], protocols: tuple[str, ...]
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        if self.websockets >= self._max_websockets:
            raise UpstreamError(
                "websockets", f"upstream.max_websockets ({self._max_websockets}) are open"
            )
        self.websockets += 1
        try:
            async with self._connect_websocket(target, headers, protocols) as ws:
                yield ws
        finally:
            self.websockets -= 1

    @contextlib.asynccontextmanager
    async def _connect_websocket(
        self, target: str, headers: CIMultiDict[str], protocols: tuple[str, ...]
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        try:
            ws = await self._session.ws_connect(
                self._url(target),
                headers=headers,
                protocols=protocols,
                autoping=False,
                autoclose=False,
                # Never offer permessage-deflate: the upstream's messages are inflated by
                # nobody (a compressed frame is refused as a protocol error).
                compress=0,
                max_msg_size=reader_limit(self._max_message),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamHandshakeRefused(exc.status) from exc
        except TimeoutError as exc:
            raise UpstreamError("timeout", "upstream did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError("connect", f"cannot connect to upstream: {exc.os_error}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("protocol", f"upstream WebSocket failed: {_describe(exc)}") from exc
        try:
            yield ws
        finally:
            # A no-op after the relay closed it with the right code; otherwise the relay
            # was cancelled (shutdown, the client's connection lost): the other end of this
            # connection is going away, which a default 1000 ("done, normally") would hide.
            await ws.close(code=WSCloseCode.GOING_AWAY)

    async def probe(self) -> bool:
        try:
            async with self._session.head(
                self._base + "/",
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=2.0),
            ):
                return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._session.close()


def reader_limit(max_message: int) -> int:
    """aiohttp's ``max_msg_size`` for a cap of ``max_message`` bytes, inclusive.

    aiohttp 3.x refuses a message whose size is *equal to* ``max_msg_size`` or more (the
    frame-header check in ``_websocket/reader_py.py`` is ``>=``), so one more lets a message
    of exactly the configured size through.
    """
    return max_message + 1


class UpstreamHandshakeRefused(Exception):
    """The upstream answered a WebSocket upgrade with something other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream refused the WebSocket upgrade with {status}")
        self.status = status


class _BodyTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    # Not a TimeoutError: aiohttp's body writer passes an OSError (TimeoutError is one) on
    # as the request's own timeout, which would read as the upstream's fault (504).
    pass


class ClientSlots:
    """How many of one thing (upstream requests, WebSockets) each client holds, capped at
    ``limit`` per client; a client is a :func:`sidecar.net.client_key`. No I/O."""

    __slots__ = ("_held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[ClientKey, int] = {}

    def take(self, client: ClientKey) -> bool:
        """Count one in and return True, or return False (nothing counted) at the cap."""
        held = self._held.get(client, 0)
        if held >= self.limit:
            return False
        self._held[client] = held + 1
        return True

    def give_back(self, client: ClientKey) -> None:
        """Count out one that :meth:`take` counted in."""
        held = self._held[client] - 1
        if held:
            self._held[client] = held
        else:
            del self._held[client]


@dataclass(frozen=True, slots=True)
class Admission:
    """What a relayed WebSocket was let through on, to be judged on again while it is open.

    ``identity`` and ``session`` are what the identity stage and the MFA gate read at the
    upgrade; None when that stage did not look (anonymous, an exempt path, an API token
    the MFA gate lets pass). The identity is not asked again: the console ends its own
    sessions' WebSockets on logout.
    """

    client_ip: IpAddress
    raw_path: str
    identity: Identity | None
    session: SessionView | None


class RelayedWebSocket:
    """One relayed WebSocket: its two ends, what it was admitted on, and a way to end it."""

    __slots__ = ("_ended", "admission", "client", "console")

    def __init__(
        self,
        client: web.WebSocketResponse,
        console: aiohttp.ClientWebSocketResponse,
        admission: Admission,
    ) -> None:
        self.client = client
        self.console = console
        self.admission = admission
        self._ended: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def end(self, code: int, reason: str) -> None:
        """Stop relaying: the client is closed with ``code`` and ``reason`` (e.g. 1008, policy
        violation), the console with 1001 (going away: it did nothing wrong) and the same
        reason. Done by the relay's own task, soon after; calling it again changes nothing."""
        if not self._ended.done():
            self._ended.set_result((code, reason))

    @property
    def ended(self) -> asyncio.Future[tuple[int, str]]:
        return self._ended


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return _connection_tokens_of(headers.getall("Connection", ()))


def end_to_end_headers(
    headers: CIMultiDictProxy[str],
    extra_drop: frozenset[str] = frozenset(),
    *,
    drop_underscored: bool = False,
) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop fields, those named in ``Connection`` (never
    Host, Cookie or Authorization), and ``extra_drop``; repeated fields (``Set-Cookie``)
    keep every line and their order.

    ``drop_underscored`` removes names containing ``_`` (as nginx does by default): CGI and
    WSGI servers map ``X_Forwarded_User`` and ``X-Forwarded-User`` to the same variable, so
    an underscore spelling would slip past every name-based filter.
    """
    drop = _connection_tokens(headers) - NEVER_HOP_BY_HOP
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in drop or lowered in extra_drop:
            continue
        if drop_underscored and "_" in name:
            continue
        out.add(name, value)
    return out


class Proxy:
    """The catch-all handler: forwards whatever earlier stages let through."""

    def __init__(
        self,
        *,
        transport: Callable[[], UpstreamTransport],
        metrics: Metrics,
        live: LiveSettings,
        max_requests_per_client: int,
        max_websockets_per_client: int,
        websocket_max_message: int,
        session_cookie: str,
        identity_headers: frozenset[str],
        prefix: str,
    ) -> None:
        self._transport = transport
        self._live = live
        self._session_cookie = session_cookie
        self._identity_headers = identity_headers | LOOKALIKE_IDENTITY
        self._prefix = prefix
        self._metrics = metrics
        self._websocket_max_message = websocket_max_message
        #: Upstream requests and relayed WebSockets, per client.
        self.requests_by_client = ClientSlots(max_requests_per_client)
        self.websockets_by_client = ClientSlots(max_websockets_per_client)
        #: Relayed WebSockets: judged again while open (sidecar.websocket_review), closed
        #: properly (1001) by a shutdown.
        self.open_websockets: set[RelayedWebSocket] = set()

    async def close_websockets(self, reason: bytes = b"server shutting down") -> None:
        """Close every relayed WebSocket on both sides with 1001 (going away)."""
        for relay in list(self.open_websockets):
            for side in (relay.client, relay.console):
                with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                    await side.close(code=1001, message=reason)

    def _upstream_headers(self, request: web.Request, drop: frozenset[str]) -> CIMultiDict[str]:
        if not request.get(PEER_TRUSTED, False):
            # Identity headers are believed only from a trusted auth proxy; from anyone else
            # they are removed so the console cannot be fooled by them either.
            drop = drop | self._identity_headers
        headers = end_to_end_headers(request.headers, drop, drop_underscored=True)
        cookies = headers.getall("Cookie", ())
        if cookies:
            # Exactly the cookie line introspection judged (see console_cookies): without
            # the sidecar's own cookie, and without pairs other parsers read differently.
            del headers["Cookie"]
            for line in console_cookies(cookies, self._session_cookie):
                headers.add("Cookie", line)
        # The same context identity introspection sent (see sidecar.net.forwarding): the
        # console answers the forwarded request for what it was asked about.
        for name, value in request[FORWARDING].header_lines():
            headers[name] = value
        headers["Via"] = VIA
        return headers

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = request.rel_url.raw_path_qs
        if not target.startswith("/"):
            return web.Response(status=400, text="bad request target\n")
        if is_under(request.path, self._prefix) or may_reach_prefix(
            request.rel_url.raw_path, self._prefix
        ):
            # Decoded, this is a sidecar path ("/mfa%2F..%2Fadmin"): the router did not match
            # it to a sidecar route, and the console may decode it the same way. Never
            # forward anything below the prefix, however a server may decode it
            # ("/mfa%C0%AFadmin", "/%EF%BD%8Dfa/admin", "/MFA/admin": see sidecar.paths).
            return web.Response(status=404, text="not found\n")
        websocket = (
            request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in _connection_tokens(request.headers)
        )
        slots = self.websockets_by_client if websocket else self.requests_by_client
        # The resolved client (the client-IP stage always sets it before this stage runs).
        client_ip = request.get(CLIENT_IP)
        client = client_key(client_ip) if client_ip is not None else None
        if client is not None and not slots.take(client):
            setting = "max_websockets_per_client" if websocket else "max_requests_per_client"
            return self._upstream_failed(
                request,
                UpstreamError(
                    "websockets" if websocket else "per_client",
                    f"the client has upstream.{setting} ({slots.limit}) at the upstream",
                ),
            )
        try:
            if websocket:
                return await self._websocket(request, target)
            return await self._http(request, target)
        finally:
            if client is not None:
                slots.give_back(client)

    def _upstream_failed(self, request: web.Request, error: UpstreamError) -> web.Response:
        request[DECISION] = Decision.UPSTREAM_ERROR
        request[REASON] = str(error)
        self._metrics.upstream_errors(error.kind)
        if error.kind in BUSY:
            response = web.Response(
                status=503,
                text="upstream busy, try again shortly\n",
                headers={"Retry-After": str(BUSY_RETRY_AFTER)},
            )
            if request.body_exists:
                # The body was never read: this connection cannot be reused.
                response.force_close()
            return response
        if error.kind == "timeout":
            return web.Response(status=504, text="upstream timed out\n")
        return web.Response(status=502, text="upstream unavailable\n")

    async def _http(self, request: web.Request, target: str) -> web.StreamResponse:
        listen = self._live.config.listen
        max_body_size, body_timeout = listen.max_body_size, listen.body_timeout
        length = request.content_length
        if length is not None and length > max_body_size:
            return _too_large(request)
        headers = self._upstream_headers(request, CLIENT_FORWARDING)
        body: AsyncIterator[bytes] | None = None
        too_large = client_gone = stalled = False
        if request.body_exists:
            if length is not None:
                headers["Content-Length"] = str(length)

            async def stream_body() -> AsyncIterator[bytes]:
                nonlocal too_large, client_gone, stalled
                received = 0
                content = request.content
                while True:
                    try:
                        # An idle deadline, renewed by every chunk: a body that trickles
                        # in keeps going, one that stops holds its upstream connection
                        # for at most this long.
                        async with asyncio.timeout(body_timeout):
                            chunk = await content.readany()
                    except TimeoutError:
                        stalled = True
                        raise _BodyStalled from None
                    except Exception:
                        # The client went away mid-upload: not the upstream's failure.
                        client_gone = True
                        raise
                    if not chunk:
                        return
                    received += len(chunk)
                    if received > max_body_size:
                        too_large = True
                        raise _BodyTooLarge
                    yield chunk

            body = stream_body()

        started = time.perf_counter()
        response: web.StreamResponse | None = None
        try:
            async with self._transport().request(request.method, target, headers, body) as upstream:
                self._metrics.upstream_duration.observe(time.perf_counter() - started)
                request[UPSTREAM_STATUS] = upstream.status
                response = web.StreamResponse(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=end_to_end_headers(upstream.headers),
                )
                await response.prepare(request)
                async for chunk in upstream.iter_body():
                    await response.write(chunk)
                if too_large or stalled:
                    # The upstream answered before reading the whole body; the client is
                    # still sending (more than allowed, or nothing): do not keep the
                    # connection.
                    response.force_close()
                await response.write_eof()
                return response
        except UpstreamError as error:
            if client_gone:
                # Logged as 499 by the request log; no upstream error counted.
                raise ConnectionResetError("client closed the connection mid-upload") from error
            if stalled:
                return self._body_stalled(request, response)
            if too_large and response is None:
                return _too_large(request)
            if response is not None and response.prepared:
                return _abort(request, response, error, self._metrics)
            return self._upstream_failed(request, error)
        except _BodyTooLarge:
            return _too_large(request)
        except _BodyStalled:
            return self._body_stalled(request, response)

    def _body_stalled(
        self, request: web.Request, response: web.StreamResponse | None
    ) -> web.StreamResponse:
        """The request body sent nothing for ``listen.body_timeout``: 408 when nothing was
        answered yet, else a broken connection (the answer cannot be trusted complete)."""
        request[REASON] = "request body idle for listen.body_timeout"
        self._metrics.connection_refused("body_timeout")
        if response is not None and response.prepared:
            if request.transport is not None:
                request.transport.abort()
            response.force_close()
            return response
        answer = web.Response(status=408, text="request body not received in time\n")
        # The rest of the body may still come: this connection cannot be reused.
        answer.force_close()
        return answer

    async def _websocket(self, request: web.Request, target: str) -> web.StreamResponse:
        headers = self._upstream_headers(request, CLIENT_FORWARDING | WEBSOCKET_HANDSHAKE)
        offered = tuple(
            p.strip()
            for line in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in line.split(",")
            if p.strip()
        )
        client_ip = request[CLIENT_IP]
        assert client_ip is not None  # the client-IP stage refuses requests without one
        admission = Admission(
            client_ip=client_ip,
            raw_path=request.rel_url.raw_path,
            identity=request.get(IDENTITY),
            session=request.get(MFA_SESSION),
        )
        try:
            async with self._transport().websocket(target, headers, offered) as upstream:
                request[UPSTREAM_STATUS] = 101
                downstream = web.WebSocketResponse(
                    protocols=(upstream.protocol,) if upstream.protocol else (),
                    autoping=False,
                    autoclose=False,
                    # permessage-deflate lets a 60 KB frame inflate to hundreds of MB in
                    # here: never negotiated, and a frame with RSV1 set is refused (1002).
                    compress=False,
                    max_msg_size=reader_limit(self._websocket_max_message),
                )
                await downstream.prepare(request)
                relay = RelayedWebSocket(downstream, upstream, admission)
                self.open_websockets.add(relay)
                try:
                    await _pump_websockets(relay)
                finally:
                    self.open_websockets.discard(relay)
                return downstream
        except UpstreamHandshakeRefused as refused:
            request[UPSTREAM_STATUS] = refused.status
            status = refused.status if 400 <= refused.status < 600 else 502
            return web.Response(status=status, text="upstream refused the WebSocket upgrade\n")
        except UpstreamError as error:
            return self._upstream_failed(request, error)


def _too_large(request: web.Request) -> web.Response:
    request[REASON] = "request body over listen.max_body_size"
    response = web.Response(status=413, text="request body too large\n")
    # The rest of the body is still on the wire: this connection cannot be reused.
    response.force_close()
    return response


def _abort(
    request: web.Request, response: web.StreamResponse, error: UpstreamError, metrics: Metrics
) -> web.StreamResponse:
    """The status line is already out: the only honest signal left is a broken connection.

    Ending the response normally would terminate a chunked body cleanly (or leave a
    Content-Length body short on a kept-alive connection), and the client would take a
    truncated download for a complete one.
    """
    request[DECISION] = Decision.UPSTREAM_ERROR
    request[REASON] = str(error)
    metrics.upstream_errors(error.kind)
    log.warning("upstream body broke off, aborting client connection: %s", error)
    if request.transport is not None:
        request.transport.abort()
    response.force_close()
    return response


WsSide = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def close_code_for_peer(error: BaseException | None, *, from_client: bool) -> int:
    """The close code sent to one side when the other ended without a close frame.

    ``error`` is what reading that other side failed with (None: it just went away). When
    the failure is a WebSocket protocol violation (aiohttp's ``WebSocketError``: a message
    over the cap is 1009, a compressed or malformed frame 1002, bad UTF-8 1007), aiohttp has
    already closed the offending side with that code. The other side learns:

    - from the client: 1001 (going away) for the console, whatever happened; it did nothing
      wrong, and its sessions end as when a browser tab closes. A 1009 would tell it that
      one of *its* messages was refused.
    - from the console: 1009 for the client when the console's message was over the cap
      (the client learns the reason, and does not simply reconnect into the same message);
      1014 (bad gateway, RFC 6455 registry) for any other console failure or disappearance.
    """
    if from_client:
        return 1001
    if isinstance(error, WebSocketError) and error.code == WSCloseCode.MESSAGE_TOO_BIG:
        return int(WSCloseCode.MESSAGE_TOO_BIG)
    return 1014


async def _pump_websockets(relay: RelayedWebSocket) -> None:
    """Relay frames both ways until either side closes, or the relay is ended
    (:meth:`RelayedWebSocket.end`); close codes and reasons, ping and pong payloads pass
    through unchanged."""
    downstream, upstream = relay.client, relay.console

    async def pump(source: WsSide, sink: WsSide, *, from_client: bool) -> tuple[int, str]:
        while True:
            msg = await source.receive()
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await sink.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return int(msg.data), msg.extra or ""
            else:  # CLOSING, CLOSED, ERROR: the source went away without a close frame
                error = msg.data if msg.type is WSMsgType.ERROR else None
                return close_code_for_peer(error, from_client=from_client), ""

    to_upstream = asyncio.ensure_future(pump(downstream, upstream, from_client=True))
    to_downstream = asyncio.ensure_future(pump(upstream, downstream, from_client=False))
    try:
        done, _ = await asyncio.wait(
            (to_upstream, to_downstream, relay.ended), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # Also when this handler is cancelled (shutdown): never leave a pump running.
        for task in (to_upstream, to_downstream):
            if not task.done():
                task.cancel()
        for task in (to_upstream, to_downstream):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if relay.ended in done:
        # Ended by the sidecar (no longer allowed): that wins over a close crossing it.
        code, reason = relay.ended.result()
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            await downstream.close(code=code, message=reason.encode())
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            await upstream.close(code=WSCloseCode.GOING_AWAY, message=reason.encode())
        return
    first = done.pop()
    try:
        code, reason = first.result()
    except (ConnectionError, aiohttp.ClientError, RuntimeError):
        code, reason = 1011, ""
    closer: WsSide = upstream if first is to_upstream else downstream
    origin: WsSide = downstream if first is to_upstream else upstream
    # Pass the close on with its code and reason, then answer the side that started it.
    with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
        await closer.close(code=code, message=reason.encode())
    with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
        await origin.close(code=code)
