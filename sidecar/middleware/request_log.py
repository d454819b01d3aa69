"""Outermost stage: one log line and the request metrics for every request.

It also turns an unexpected exception into a plain 500 without a traceback on the wire (the
traceback goes to the log), so a bug never leaks internals to a client.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.decision import Decision
from sidecar.logs import fields
from sidecar.metrics import Metrics
from sidecar.state import CLIENT_IP, DECISION, LOG_PATH, REASON, UPSTREAM_STATUS

log = logging.getLogger("sidecar.access")


class InFlight:
    """How many requests are being handled right now (a graceful shutdown waits for 0)."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()


def request_log_middleware(*, metrics: Metrics, in_flight: InFlight) -> Middleware:
    @web.middleware
    async def request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        in_flight.enter()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        except ConnectionError:
            # The client closed the connection while we were answering (aiohttp raises
            # ClientConnectionResetError, a ConnectionResetError, or, when it went while a
            # write waited for it to read, a plain ConnectionError), or it was cut off for
            # not reading (listen.send_timeout): nothing to answer, and nothing went wrong on
            # our side. Logged as 499, never as an error.
            status = 499
            request[REASON] = "client closed the connection"
            return web.Response(status=499)
        except Exception:
            log.exception("unhandled error", extra=fields(path=request.path))
            return web.Response(status=500, text="internal error\n")
        finally:
            in_flight.leave()
            elapsed = time.perf_counter() - started
            decision = request.get(DECISION, Decision.ALLOWED)
            metrics.request_done(decision, elapsed)
            if log.isEnabledFor(logging.INFO):
                client_ip = request.get(CLIENT_IP)
                log.info(
                    "request",
                    extra=fields(
                        method=request.method,
                        # Never the query string: it may carry tokens.
                        path=request.get(LOG_PATH, request.path),
                        status=status,
                        decision=decision.value,
                        client_ip=str(client_ip) if client_ip is not None else None,
                        peer=request.remote,
                        duration_ms=round(elapsed * 1000, 3),
                        upstream_status=request.get(UPSTREAM_STATUS),
                        reason=request.get(REASON),
                    ),
                )

    return request_log
