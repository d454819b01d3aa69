"""What the browser tests of the pages share: serving real pages and assets under the CSP
the pages promise to work with, in front of a scripted stub of the JSON API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar.mfa import pages

CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'"


class PageServing:
    """Handlers for a stub app: the CSP header on every answer, pages, static assets."""

    @web.middleware
    async def csp(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        response.headers["Content-Security-Policy"] = CSP
        return response

    @staticmethod
    def page(make: Callable[[], str]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(text=make(), content_type="text/html")

        return handler

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = pages.static_file(name)
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, headers={"Content-Type": pages.STATIC_FILES[name]})
