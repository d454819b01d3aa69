"""Redirect a request whose path is not canonical to its canonical form (see sidecar.paths).

Browsers never send dot segments or encoded unreserved characters, so only tools and
attackers meet this; a 308 keeps the method and body. After this stage every exemption and
prefix match, and the path the console receives, are the same string.

The redirect never sends a browser to another site: a canonical form that a browser would not
resolve on this origin (``/./\\evil.example`` canonicalises to ``/\\evil.example``, which
browsers read as ``//evil.example``) is refused with 400 instead (``paths.is_local_path``).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar.paths import canonical_path, is_local_path
from sidecar.state import REASON


def canonical_path_middleware() -> Middleware:
    @web.middleware
    async def canonical(request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = request.rel_url.raw_path
        canonical = canonical_path(raw)
        if canonical == raw:
            return await handler(request)
        query = request.rel_url.raw_query_string
        location = canonical + ("?" + query if query else "")
        if not is_local_path(location):
            request[REASON] = "non-canonical path without a local canonical form"
            return web.Response(status=400, text="bad request path\n")
        request[REASON] = "non-canonical path redirected"
        return web.Response(status=308, headers={"Location": location})

    return canonical
