"""How the sidecar answers a refusal: a page for a browser navigation, JSON for everything
else (XHR, fetch, API clients), so that scripts get something they can parse and people get
something they can read."""

from __future__ import annotations

import html
import json

from aiohttp import web


def is_html_navigation(request: web.Request) -> bool:
    """A top-level browser navigation (not fetch/XHR), judged from Fetch Metadata when the
    browser sends it, else from the method and ``Accept``."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate"
    if request.method not in ("GET", "HEAD") or "X-Requested-With" in request.headers:
        return False
    return "text/html" in request.headers.get("Accept", "")


def json_error(status: int, error: str, message: str, **extra: object) -> web.Response:
    response = web.json_response({"error": error, "message": message, **extra}, status=status)
    response.headers["Cache-Control"] = "no-store"
    return response


def unavailable(request: web.Request, error: str, message: str) -> web.Response:
    """503 for a decision the sidecar cannot make now (fail closed)."""
    if is_html_navigation(request):
        body = (
            "<!doctype html><html lang=en><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>Temporarily unavailable</title><h1>Temporarily unavailable</h1>"
            f"<p>{html.escape(message)} Please try again in a moment.</p></html>"
        )
        response = web.Response(status=503, text=body, content_type="text/html")
        response.headers["Retry-After"] = "5"
        response.headers["Cache-Control"] = "no-store"
        return response
    response = json_error(503, error, message)
    response.headers["Retry-After"] = "5"
    return response


class Refusal(web.HTTPException):
    """A JSON refusal raised from a handler or a guard it calls (``{"error", "message",
    ...}``, ``Cache-Control: no-store``), so handlers read as straight-line code. ``error``
    is the machine-readable reason (e.g. ``csrf``, ``step_up_required``)."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: object,
    ) -> None:
        self.status_code = status
        self.error = error
        body = json.dumps({"error": error, "message": message, **extra}, default=str)
        super().__init__(
            text=body,
            content_type="application/json",
            headers={"Cache-Control": "no-store", **(headers or {})},
        )


#: What every answer of the sidecar's own (pages, API, refusals) carries: its pages use only
#: same-origin scripts and styles (no inline script, no eval), may not be framed by anyone
#: (clickjacking a "Remove passkey" button), and leak no URL (which can hold ``next``) in
#: ``Referer``.
OWN_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def harden(response: web.StreamResponse) -> web.StreamResponse:
    """Add ``OWN_PAGE_HEADERS`` (those the handler did not set itself) before it is sent."""
    if not response.prepared:
        for name, value in OWN_PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    return response
