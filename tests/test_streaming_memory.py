"""Large bodies stream through a real sidecar process in bounded memory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.process import run_sidecar

MiB = 1024 * 1024
UPLOAD = 200 * MiB
DOWNLOAD = 100 * MiB
RSS_LIMIT = 200 * MiB


def big_body_upstream() -> web.Application:
    app = web.Application()

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"bytes": size, "sha256": digest.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = DOWNLOAD
        await response.prepare(request)
        block = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(DOWNLOAD // MiB):
            await response.write(block)
        return response

    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    return app


@pytest.mark.slow
async def test_200mib_upload_and_100mib_download_in_bounded_memory(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream = await aiohttp_server(big_body_upstream())
    block = os.urandom(MiB)
    expected = hashlib.sha256()
    for _ in range(UPLOAD // MiB):
        expected.update(block)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(UPLOAD // MiB):
            yield block

    with run_sidecar(
        tmp_path, f"http://127.0.0.1:{upstream.port}", listen={"max_body_size": "1GiB"}
    ) as sidecar:
        baseline = sidecar.peak_rss_bytes()
        async with aiohttp.ClientSession() as session:
            async with session.post(
                sidecar.url + "/upload", data=body(), headers={"Content-Length": str(UPLOAD)}
            ) as response:
                assert response.status == 200
                assert await response.json() == {
                    "bytes": UPLOAD,
                    "sha256": expected.hexdigest(),
                }
            received = 0
            async with session.get(sidecar.url + "/download") as response:
                assert response.status == 200
                async for chunk in response.content.iter_any():
                    received += len(chunk)
            assert received == DOWNLOAD
        peak = sidecar.peak_rss_bytes()
    print(f"sidecar peak RSS {peak / MiB:.0f} MiB, at start {baseline / MiB:.0f} MiB")
    assert peak < RSS_LIMIT, f"peak RSS {peak / MiB:.0f} MiB (at start {baseline / MiB:.0f})"
