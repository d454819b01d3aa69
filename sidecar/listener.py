"""The public listener's connection guard: deadlines for request heads and for sending to a
client, caps on connections.

aiohttp's server has a keep-alive timeout but no deadline for a complete request head, nor
for a write to a client that stopped reading: a connection that never sends a byte, or
trickles a header line every few seconds, is held until the keep-alive timeout, a client that
never reads its answer holds its connection (and the upstream connection feeding it) for
ever, and a few thousand of either exhaust the process's file descriptors or the upstream
pool. Promises, per process:

- **Head deadline** (``listen.header_timeout``): a connection delivers a complete request head
  within the timeout of being accepted (its first request), or of the first byte of a later
  request received while it is idle on a kept-alive connection; otherwise it is closed.
  A connection that had sent part of a head gets ``408 Request Timeout`` first; one that sent
  nothing at all is closed silently, as nginx does, so a browser's speculative
  pre-connection is never answered with an error. An idle kept-alive connection that sends
  nothing is not affected (the keep-alive timeout applies), nor is a request whose head is
  complete (its body is timed by the proxy, ``listen.body_timeout``). Bytes a client
  pipelines behind a request it has not received the answer to (browsers never do) are
  bounded by the keep-alive timeout, like an idle connection.
- **Send deadline** (``listen.send_timeout``, nginx's ``send_timeout``): when the client does
  not take any of what the sidecar sends it for that long (the socket's send buffer is full
  and the bytes waiting for it, :func:`unsent_bytes`, do not shrink), the connection is
  aborted. Whatever was
  writing to it (a proxied answer, a relayed WebSocket, a sidecar page) fails at once and
  releases what it holds, the upstream connection included. A client that reads slowly but
  reads something within each period is not cut off.
- **Connection caps**: at most ``listen.max_connections`` connections open, and at most
  ``listen.max_connections_per_address`` from one client, except peers in
  ``network.trusted_proxies`` (a balancer carries many clients; its connections count in the
  total only). A connection over a cap is answered ``503 Service Unavailable`` with
  ``Connection: close`` and closed before any of its bytes are read.
- The limits and the trusted proxies are read when a connection is accepted (each deadline
  when it starts), from the live settings: a reload applies to new connections. Each refusal
  is counted in ``sidecar_connections_refused_total{reason}`` and open connections in
  ``sidecar_open_connections``; refusals are logged at most once per reason every 10 s.

Security assumptions: the address counted is the TCP peer, as the kernel reports it (never
a forwarded header: none has been read when a connection is accepted). One client is an IPv4
address or an IPv6 /64 (:func:`sidecar.net.client_key`): any IPv6 host holds a whole /64, and
counted per address it alone could fill ``max_connections``. Everyone behind one NAT address,
or on one IPv6 LAN, shares the cap. With ``workers: N`` each process enforces its own caps:
the listener as a whole holds up to N times them (the kernel spreads connections over the
processes).

How: this hooks into aiohttp 3.x internals, kept to a few overrides. ``web.Server`` is the
protocol factory (``__call__`` builds a ``web_protocol.RequestHandler`` per connection);
``AppRunner._make_server()`` builds the server; ``RequestHandler._request_count`` grows when
a request head is complete, and ``RequestHandler._waiter`` is a pending future while the
handler waits for the next request; ``pause_writing``/``resume_writing`` are asyncio's flow
control callbacks, which aiohttp's ``drain()`` waits on. aiohttp is pinned below 4, and the
tests drive this module over real sockets (asyncio and uvloop), so a change of those
internals fails them.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import resource
import sys
import termios
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from sidecar.logs import fields
from sidecar.net import ClientKey, IpAddress, client_key, parse_ip

log = logging.getLogger("sidecar.listener")

#: Why the listener refused or cut off a connection (the proxy adds ``body_timeout``, see
#: ``sidecar.metrics.CONNECTION_REFUSALS``).
Refusal = Literal["total", "per_address", "header_timeout", "send_timeout"]
REFUSALS: tuple[Refusal, ...] = ("total", "per_address", "header_timeout", "send_timeout")

# Minimal answers written straight to the transport: no request was parsed, so there is
# nothing for aiohttp's response machinery to answer.
_SERVICE_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 22\r\n\r\n"
    b"Too many connections.\n"
)
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 26\r\n\r\n"
    b"Request head not in time.\n"
)
_LOG_EVERY_SECONDS = 10.0


class ConnectionLimits(Protocol):
    """The caps :class:`ConnectionCounts` admits by."""

    @property
    def max_connections(self) -> int: ...

    @property
    def max_connections_per_address(self) -> int: ...


class ListenerLimits(ConnectionLimits, Protocol):
    """What the guard reads from the live settings (``Config.listen`` has these): the caps at
    accept time, each deadline when it starts."""

    @property
    def header_timeout(self) -> float: ...

    @property
    def send_timeout(self) -> float: ...


class ConnectionMetrics(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def connection_refused(self, reason: Refusal) -> None: ...


class ConnectionCounts:
    """Open connections, in total and per client (an IPv4 address or an IPv6 /64, see
    :func:`sidecar.net.client_key`); decides admission. No I/O."""

    __slots__ = ("_by_client", "total")

    def __init__(self) -> None:
        self.total = 0
        self._by_client: dict[ClientKey, int] = {}

    def from_address(self, address: IpAddress | None) -> int:
        """Connections counted against the client ``address`` belongs to."""
        return self._by_client.get(client_key(address), 0) if address is not None else 0

    def admit(
        self, address: IpAddress | None, *, exempt: bool, limits: ConnectionLimits
    ) -> Refusal | None:
        """Count the connection in and return None, or return why it is refused (and count
        nothing). ``exempt`` peers (trusted proxies) count in the total only: a balancer's
        connections never use up the slots of the addresses next to it (its /64)."""
        if self.total >= limits.max_connections:
            return "total"
        if exempt or address is None:
            self.total += 1
            return None
        key = client_key(address)
        held = self._by_client.get(key, 0)
        if held >= limits.max_connections_per_address:
            return "per_address"
        self.total += 1
        self._by_client[key] = held + 1
        return None

    def release(self, address: IpAddress | None, *, exempt: bool = False) -> None:
        """Count out a connection that :meth:`admit` counted in (with the same ``exempt``)."""
        self.total -= 1
        if exempt or address is None:
            return
        key = client_key(address)
        held = self._by_client[key] - 1
        if held:
            self._by_client[key] = held
        else:
            del self._by_client[key]


class ConnectionGuard:
    """One per listener: the counts, where the live limits come from, metrics and logs."""

    def __init__(
        self,
        *,
        limits: Callable[[], ListenerLimits],
        exempt: Callable[[IpAddress], bool],
        metrics: ConnectionMetrics,
    ) -> None:
        self.counts = ConnectionCounts()
        self.limits = limits
        self._exempt = exempt
        self._metrics = metrics
        self._last_logged: dict[Refusal, float] = {}
        self._unlogged: dict[Refusal, int] = dict.fromkeys(REFUSALS, 0)

    def is_exempt(self, address: IpAddress | None) -> bool:
        """Whether ``address`` is a trusted proxy, exempt from the per-address cap."""
        return address is not None and self._exempt(address)

    def admit(self, address: IpAddress | None, *, exempt: bool) -> Refusal | None:
        refusal = self.counts.admit(address, exempt=exempt, limits=self.limits())
        if refusal is None:
            self._metrics.connection_opened()
        else:
            self.refused(refusal, address)
        return refusal

    def release(self, address: IpAddress | None, *, exempt: bool) -> None:
        self.counts.release(address, exempt=exempt)
        self._metrics.connection_closed()

    def refused(self, reason: Refusal, address: IpAddress | None) -> None:
        self._metrics.connection_refused(reason)
        # A flood must not become a flood of log lines: one per reason per interval, with
        # the number left unlogged since the previous one.
        now = time.monotonic()
        last = self._last_logged.get(reason)
        if last is not None and now - last < _LOG_EVERY_SECONDS:
            self._unlogged[reason] += 1
            return
        self._last_logged[reason] = now
        also, self._unlogged[reason] = self._unlogged[reason], 0
        log.warning(
            "connection refused" if reason in ("total", "per_address") else "connection timed out",
            extra=fields(
                reason=reason,
                peer=str(address) if address is not None else None,
                open_connections=self.counts.total,
                more_since_last_log=also,
            ),
        )


def _peer_address(transport: asyncio.BaseTransport) -> IpAddress | None:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return parse_ip(peer[0])
    return None


class _GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, with admission, the head deadline and the send
    deadline."""

    __slots__ = (
        "_admitted",
        "_exempt",
        "_guard",
        "_head_bytes",
        "_head_timer",
        "_heads_at_arm",
        "_peer",
        "_send_timer",
        "_unsent_at_arm",
    )

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._peer: IpAddress | None = None
        self._exempt = False
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_at_arm = 0
        self._head_bytes = 0
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent_at_arm = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._peer = _peer_address(transport)
        self._exempt = self._guard.is_exempt(self._peer)
        if self._guard.admit(self._peer, exempt=self._exempt) is not None:
            # Not handed to aiohttp at all: nothing of this connection is read or parsed.
            refused = cast(asyncio.Transport, transport)
            refused.write(_SERVICE_UNAVAILABLE)
            refused.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm_head_deadline()  # the first request: from the accept

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._head_timer is None:
            waiter = self._waiter
            if data and waiter is not None and not waiter.done():
                # Idle between requests, and this is the first byte of the next head.
                self._arm_head_deadline()
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_timer is not None and self._request_count != self._heads_at_arm:
            self._disarm_head_deadline()  # a head is complete (or was refused with 400)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._disarm_head_deadline()
        self._disarm_send_deadline()
        self._guard.release(self._peer, exempt=self._exempt)
        super().connection_lost(exc)

    # --- the head deadline ----------------------------------------------------------------

    def _arm_head_deadline(self) -> None:
        self._heads_at_arm = self._request_count
        self._head_bytes = 0
        self._head_timer = self._loop.call_later(
            self._guard.limits().header_timeout, self._head_deadline_passed
        )

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        idle = waiter is not None and not waiter.done() and not self._messages
        if self._request_count != self._heads_at_arm or not idle or self.transport is None:
            return  # a request is being handled: never cut it off from here
        self._guard.refused("header_timeout", self._peer)
        if self._head_bytes:
            self.transport.write(_REQUEST_TIMEOUT)
        # aiohttp's own way to end an idle connection (as its keep-alive timeout does):
        # the request loop stops, the transport closes once the write buffer is flushed.
        self.force_close()

    # --- the send deadline ----------------------------------------------------------------
    # The transport calls pause_writing() when its buffer is over the high-water mark (the
    # kernel's send buffer is full: the client is not reading), and resume_writing() once it
    # drained below the low-water mark. Every writer of this connection (a proxied body, a
    # WebSocket relay, the sidecar's pages) waits in aiohttp's drain() meanwhile, which has no
    # deadline of its own; this is that deadline, for all of them at once.

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._admitted and self.transport is not None:
            self._arm_send_deadline(unsent_bytes(self.transport))

    def resume_writing(self) -> None:
        self._disarm_send_deadline()
        super().resume_writing()

    def _arm_send_deadline(self, unsent: int) -> None:
        self._unsent_at_arm = unsent
        self._send_timer = self._loop.call_later(
            self._guard.limits().send_timeout, self._send_deadline_passed
        )

    def _disarm_send_deadline(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_deadline_passed(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None or not self.writing_paused:
            return
        unsent = unsent_bytes(transport)
        if unsent < self._unsent_at_arm:
            self._arm_send_deadline(unsent)  # the client took some bytes: a new period
            return
        self._guard.refused("send_timeout", self._peer)
        # Nothing can be said to a client that does not read: abort (RST), which wakes the
        # writer waiting in drain(); its next write fails, the handler ends and releases
        # what it holds (the upstream connection, a WebSocket relay).
        transport.abort()


_TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)


def unsent_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes sent to the client that it has not taken yet: those in the transport's buffer,
    plus (Linux) those in the kernel's send queue not yet acknowledged.

    The kernel's queue matters: it holds megabytes on a fast link, and reports the socket
    writable again only once about half of it has drained, so the transport's buffer alone
    stays the same while a slow client reads steadily from the kernel's.
    """
    size = cast(asyncio.WriteTransport, transport).get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _TIOCOUTQ is not None and sock is not None:
        try:
            queued = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0" * 4)
        except OSError:
            return size
        size += int.from_bytes(queued, sys.byteorder, signed=True)
    return size


class _GuardedServer(web.Server):
    """aiohttp's low-level server, building guarded handlers."""

    def __init__(self, built: web.Server, guard: ConnectionGuard) -> None:
        super().__init__(
            built.request_handler,
            request_factory=built.request_factory,
            handler_cancellation=built.handler_cancellation,
            loop=built._loop,
            **built._kwargs,
        )
        self._guard = guard

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, guard=self._guard, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections pass the :class:`ConnectionGuard`."""

    __slots__ = ("guard",)

    def __init__(self, app: web.Application, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        return _GuardedServer(await super()._make_server(), self.guard)


#: Descriptors a process needs besides client connections: the upstream pool is added
#: separately; this covers listening sockets, the store, log and audit files, the admin
#: listener's clients, the event loop's own.
FD_HEADROOM = 128


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft limit on open files to its hard limit; return the limit
    now in force. Logs it, and warns when it is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit: %s", exc)
        else:
            soft = target
    if soft < needed:
        log.warning(
            "open files limit is below what the connection caps need: connections beyond "
            "it fail at accept; raise the hard limit (systemd LimitNOFILE, ulimit -Hn) or "
            "lower listen.max_connections",
            extra=fields(open_files_limit=soft, needed=needed),
        )
    else:
        log.info("open files limit", extra=fields(open_files_limit=soft, needed=needed))
    return soft
