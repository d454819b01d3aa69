"""Redirect a request whose path is not canonical to its canonical form (see sidecar.paths).

Browsers never send dot segments or encoded unreserved characters, so only tools and
attackers meet this; a 308 keeps the method and body. After this stage every exemption and
prefix match, and the path the console receives, are the same string.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.paths import canonical_path
from sidecar.state import REASON


def canonical_path_middleware() -> Middleware:
    @web.middleware
    async def canonical(request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = request.rel_url.raw_path
        canonical = canonical_path(raw)
        if canonical == raw:
            return await handler(request)
        request[REASON] = "non-canonical path redirected"
        query = request.rel_url.raw_query_string
        location = canonical + ("?" + query if query else "")
        return web.Response(status=308, headers={"Location": location})

    return canonical
