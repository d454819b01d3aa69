"""The canonical-path stage as a browser meets it: a non-canonical path is redirected to its
canonical form, and the redirect never sends the browser to another site.

Requests are sent raw over a socket (client libraries normalise paths before sending), to a
server with only this stage in front of a catch-all handler. The property test calls the
middleware directly, so that paths aiohttp's own parser would refuse are covered too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from hypothesis import example, given, settings
from hypothesis import strategies as st
from yarl import URL

from sidecar.middleware.canonical_path import canonical_path_middleware
from tests.test_paths import ESCAPES, browser_leaves_origin


async def _reached(request: web.Request) -> web.Response:
    return web.Response(text=f"reached {request.rel_url.raw_path}")


def _app() -> web.Application:
    app = web.Application(middlewares=[canonical_path_middleware()])
    app.router.add_route("*", "/{tail:.*}", _reached)
    return app


async def _raw_get(server: TestServer, target: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers for ``GET <target>`` sent byte for byte."""
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = dict(line.split(": ", 1) for line in head[1:])
    return status, headers


@pytest.mark.parametrize(
    ("target", "status", "location"),
    [
        # Canonical forms a browser reads as another host: refused, never redirected.
        pytest.param(b"/./\\evil.example", 400, None, id="/./ backslash"),
        pytest.param(b"/../\\evil.example", 400, None, id="/../ backslash"),
        pytest.param(b"//\\evil.example", 400, None, id="// backslash"),
        pytest.param(b"/%2e/\\evil.example", 400, None, id="%2e/ backslash"),
        pytest.param(b"/a/../\\/evil.example", 400, None, id="backslash slash after dot-dot"),
        pytest.param(b"/./x?a=\\", 400, None, id="backslash in the query"),
        # Redirected to a path on this site.
        pytest.param(b"/.//evil.example", 308, "/evil.example", id="/.//"),
        pytest.param(b"/..//evil.example", 308, "/evil.example", id="/..//"),
        pytest.param(b"/%2e//evil.example", 308, "/evil.example", id="/%2e//"),
        pytest.param(b"//evil.example", 308, "/evil.example", id="leading //"),
        pytest.param(b"///evil.example//", 308, "/evil.example/", id="leading ///"),
        pytest.param(b"/%2e/%5Cevil.example", 308, "/%5Cevil.example", id="%5C stays encoded"),
        pytest.param(b"/./%09/evil.example", 308, "/%09/evil.example", id="%09 stays encoded"),
        pytest.param(b"/./x?next=//evil.example", 308, "/x?next=//evil.example", id="query kept"),
        # Tab, CR, LF and other controls never reach the stage: aiohttp's parser refuses them.
        pytest.param(b"/\t/evil", 400, None, id="tab"),
        pytest.param(b"/./\t/evil.example", 400, None, id="tab after /./"),
        pytest.param(b"/.\x0b/evil", 400, None, id="vertical tab"),
        pytest.param(b"/./\x00/evil", 400, None, id="NUL"),
        # Canonical already: not this stage's business (no redirect, passed on).
        pytest.param(b"/\\evil.example", 200, None, id="backslash, canonical"),
        pytest.param(b"/settings", 200, None, id="plain"),
    ],
)
async def test_redirects_stay_on_this_site(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    target: bytes,
    status: int,
    location: str | None,
) -> None:
    server = await aiohttp_server(_app())
    got_status, headers = await _raw_get(server, target)
    assert got_status == status
    assert headers.get("Location") == location
    if location is not None:
        assert not browser_leaves_origin(location)


# Raw request targets built from what attackers use: dots, slashes and backslashes in every
# spelling, controls browsers drop, and escapes.
PIECES = ["/", "//", "\\", ".", "..", "%2e", "%2E", "%2f", "%5c", "evil.example", "x", "?", "#"]
CHARS = ["\t", "\n", "\r", " ", "\x00", "\x0b", "\x7f", "\x85", "\u00e9", "%"]
# Pieces are drawn most often: a dot segment next to a backslash is what the attack needs.
PART = st.one_of(
    st.sampled_from(PIECES),
    st.sampled_from(PIECES),
    st.sampled_from(CHARS),
    st.sampled_from(ESCAPES),
)
RAW_PATHS = st.lists(PART, max_size=14).map(lambda parts: "/" + "".join(parts))


@settings(max_examples=400, deadline=None)
@given(
    raw=st.one_of(RAW_PATHS, st.text(max_size=20).map(lambda t: "/" + t)), query=st.text(max_size=6)
)
@example(raw="/./\\evil.example", query="")
@example(raw="/.\t/\\evil.example", query="")
@example(raw="/./", query="\\")
async def test_no_redirect_leaves_the_site(raw: str, query: str) -> None:
    """Whatever the raw path: the answer is passed on, refused, or a redirect that a browser
    resolves on this site."""
    path, _, inline_query = raw.partition("?")
    url = URL.build(path=path, query_string=inline_query or query, encoded=True)
    request = make_mocked_request("GET", "/").clone(rel_url=url)
    response = await canonical_path_middleware()(request, _reached)
    if response.status == 308:
        assert not browser_leaves_origin(response.headers["Location"])
    else:
        assert response.status in (200, 400)
        assert "Location" not in response.headers
