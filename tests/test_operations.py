"""Operating a real sidecar process: hot reload on SIGHUP, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.process import SidecarProcess, run_sidecar

Release = web.AppKey("release", asyncio.Event)


def streaming_upstream() -> web.Application:
    """``/stream`` sends a first chunk, waits for ``app[Release]``, then sends the rest."""
    app = web.Application()
    app[Release] = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 2 * 65536
        await response.prepare(request)
        await response.write(b"a" * 65536)
        await asyncio.wait_for(app[Release].wait(), 20)
        await response.write(b"b" * 65536)
        return response

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/stream", stream)
    app.router.add_get("/{tail:.*}", page)
    return app


BEHIND_PROXY = {
    "network": {"trusted_proxies": ["127.0.0.0/8"]},
    "security": {"managed_by": "config", "ip_denylist": ["198.51.100.0/24"]},
    "logging": {"level": "info", "format": "json"},
}
CLIENT = {"X-Forwarded-For": "203.0.113.9"}


async def status_of(sidecar: SidecarProcess) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(sidecar.url + "/page", headers=CLIENT) as response:
            return response.status


async def metric(sidecar: SidecarProcess, line_start: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as response:
            text = await response.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in /metrics")


def rewrite(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = tmp_path / "sidecar.yaml"
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_sighup_applies_a_valid_change_and_keeps_the_old_config_on_a_bad_one(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream = await aiohttp_server(streaming_upstream())
    with run_sidecar(tmp_path, f"http://127.0.0.1:{upstream.port}", **BEHIND_PROXY) as sidecar:
        assert await status_of(sidecar) == 200
        async with aiohttp.ClientSession() as session:
            # A streamed response in flight across the reload.
            async with session.get(sidecar.url + "/stream", headers=CLIENT) as streaming:
                first = await streaming.content.readexactly(65536)

                def deny_client(raw: dict[str, Any]) -> None:
                    raw["security"]["ip_denylist"].append("203.0.113.0/24")

                rewrite(tmp_path, deny_client)
                sidecar.proc.send_signal(signal.SIGHUP)

                async def denied() -> bool:
                    return await status_of(sidecar) == 403

                await wait_for(denied)
                upstream.app[Release].set()
                rest = await streaming.read()
        assert first + rest == b"a" * 65536 + b"b" * 65536

        def break_it(raw: dict[str, Any]) -> None:
            raw["security"] = {"ip_denylist": ["10.0.0.0/33"]}

        rewrite(tmp_path, break_it)
        before = await metric(sidecar, 'sidecar_config_reloads_total{result="failure"}')
        sidecar.proc.send_signal(signal.SIGHUP)

        async def failure_counted() -> bool:
            after = await metric(sidecar, 'sidecar_config_reloads_total{result="failure"}')
            return after == before + 1

        await wait_for(failure_counted)
        assert await status_of(sidecar) == 403  # the old, valid config is still running
        assert sidecar.proc.poll() is None
    log = (tmp_path / "sidecar.log").read_text()
    assert "security.ip_denylist[0]: '10.0.0.0/33' is not a CIDR" in log
    assert "Traceback" not in log


@pytest.mark.slow
async def test_a_changed_file_is_picked_up_without_a_signal(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream = await aiohttp_server(streaming_upstream())
    with run_sidecar(tmp_path, f"http://127.0.0.1:{upstream.port}", **BEHIND_PROXY) as sidecar:
        assert await status_of(sidecar) == 200

        def deny_client(raw: dict[str, Any]) -> None:
            raw["security"]["ip_denylist"] = ["203.0.113.9"]

        rewrite(tmp_path, deny_client)

        async def denied() -> bool:
            return await status_of(sidecar) == 403

        await wait_for(denied)


@pytest.mark.slow
async def test_sigterm_lets_a_streamed_response_finish_and_refuses_new_connections(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream = await aiohttp_server(streaming_upstream())
    with run_sidecar(tmp_path, f"http://127.0.0.1:{upstream.port}", **BEHIND_PROXY) as sidecar:
        async with aiohttp.ClientSession() as session:
            async with session.get(sidecar.url + "/stream", headers=CLIENT) as streaming:
                first = await streaming.content.readexactly(65536)
                sidecar.proc.send_signal(signal.SIGTERM)

                async def unready() -> bool:
                    url = f"http://127.0.0.1:{sidecar.admin_port}/readyz"
                    try:
                        async with aiohttp.ClientSession() as probe:
                            async with probe.get(url) as response:
                                return response.status == 503
                    except aiohttp.ClientConnectionError:
                        return True

                await wait_for(unready)

                async def refused() -> bool:
                    try:
                        async with aiohttp.ClientSession() as fresh:
                            async with fresh.get(sidecar.url + "/page", headers=CLIENT):
                                return False
                    except aiohttp.ClientConnectionError:
                        return True

                await wait_for(refused)
                upstream.app[Release].set()
                rest = await streaming.read()
        assert first + rest == b"a" * 65536 + b"b" * 65536
        assert await asyncio.to_thread(sidecar.proc.wait, 15) == 0


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.slow
async def test_two_workers_both_serve_and_metrics_add_up(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream = await aiohttp_server(streaming_upstream())
    with run_sidecar(
        tmp_path, f"http://127.0.0.1:{upstream.port}", workers=2, logging={"level": "warning"}
    ) as sidecar:

        async def two_workers() -> bool:
            return len(children(sidecar.proc.pid)) == 2

        await wait_for(two_workers, 20)
        workers = children(sidecar.proc.pid)

        async def all_ready() -> bool:
            async with aiohttp.ClientSession() as session:
                for _ in range(20):
                    try:
                        async with session.get(sidecar.url + "/page") as response:
                            if response.status != 200:
                                return False
                    except aiohttp.ClientConnectionError:
                        return False
            return True

        await wait_for(all_ready, 20)
        before = {pid: cpu_ticks(pid) for pid in workers}
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection per request
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(300):
                async with session.get(sidecar.url + "/page") as response:
                    assert response.status == 200
        used = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
        assert all(ticks > 0 for ticks in used.values()), used
        total = await metric(sidecar, 'sidecar_requests_total{decision="allowed"}')
        assert total >= 300
        sidecar.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(sidecar.proc.wait, 30) == 0


def named_upstream(name: str) -> web.Application:
    """Answers every request with its ``name``."""
    app = web.Application()

    async def anything(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=name)

    app.router.add_route("*", "/{tail:.*}", anything)
    return app


async def all_serving(sidecar: SidecarProcess) -> bool:
    """The supervisor's /healthz: every worker alive and accepting."""
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{sidecar.admin_port}/healthz"
            async with session.get(url) as response:
                return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def what_the_port_answers(sidecar: SidecarProcess, rounds: int) -> dict[str, set[str]]:
    """Each probe ``rounds`` times, each time on a new connection (the kernel spreads them
    over the workers); per probe, the distinct answers."""
    seen: dict[str, set[str]] = {"page": set(), "/mfa": set(), "/other": set(), "upload": set()}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(rounds):
            async with session.get(sidecar.url + "/page") as response:
                seen["page"].add(f"{response.status} {await response.text()}")
            async with session.get(sidecar.url + "/mfa/api/status") as response:
                seen["/mfa"].add(f"{response.status}")
            async with session.get(sidecar.url + "/other/api/status") as response:
                seen["/other"].add(f"{response.status} {await response.text()}")
            async with session.post(sidecar.url + "/upload", data=b"x" * 2048) as response:
                seen["upload"].add(f"{response.status}")
    return seen


def reloaded_pids(tmp_path: Path) -> set[int]:
    """The processes that audited a config reload (the trail is created at its first record)."""
    path = tmp_path / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines]
    return {r["details"]["pid"] for r in records if r["action"] == "config.reload"}


@pytest.mark.slow
async def test_a_restarted_worker_runs_what_its_siblings_run(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    first = await aiohttp_server(named_upstream("first"))
    second = await aiohttp_server(named_upstream("second"))
    with run_sidecar(
        tmp_path, f"http://127.0.0.1:{first.port}", workers=2, logging={"level": "info"}
    ) as sidecar:

        async def two_workers() -> bool:
            return len(children(sidecar.proc.pid)) == 2 and await all_serving(sidecar)

        await wait_for(two_workers, 20)
        workers = set(children(sidecar.proc.pid))

        # Restart-only: the upstream and the prefix; reloadable: the body size cap.
        def change(raw: dict[str, Any]) -> None:
            raw["upstream"]["url"] = f"http://127.0.0.1:{second.port}"
            raw["mfa"]["path_prefix"] = "/other"
            raw["listen"]["max_body_size"] = "1KiB"

        rewrite(tmp_path, change)
        sidecar.proc.send_signal(signal.SIGHUP)

        async def both_reloaded() -> bool:
            return reloaded_pids(tmp_path) >= workers

        await wait_for(both_reloaded)
        expected = {
            "page": {"200 first"},  # the start-up upstream...
            "/mfa": {"401"},  # ...and prefix: the sidecar's own API answers there
            "/other": {"200 first"},  # the new prefix is the console's
            "upload": {"413"},  # the reloaded cap
        }
        assert await what_the_port_answers(sidecar, 30) == expected

        async def replaced(killed: int) -> int:
            os.kill(killed, signal.SIGKILL)

            async def new_worker_serving() -> bool:
                now = set(children(sidecar.proc.pid))
                return len(now) == 2 and killed not in now and await all_serving(sidecar)

            await wait_for(new_worker_serving, 20)
            (new,) = set(children(sidecar.proc.pid)) - workers
            workers.discard(killed)
            workers.add(new)
            return new

        new = await replaced(min(workers))
        before = cpu_ticks(new)
        assert await what_the_port_answers(sidecar, 60) == expected
        assert cpu_ticks(new) > before  # the new worker answered its share

        # With the file invalid, a new worker runs the last good config (not the start-up
        # one: its body cap is the reloaded one).
        def break_it(raw: dict[str, Any]) -> None:
            raw["security"] = {"ip_denylist": ["10.0.0.0/33"]}

        rewrite(tmp_path, break_it)
        sidecar.proc.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            return await metric(sidecar, 'sidecar_config_reloads_total{result="failure"}') >= 2

        await wait_for(refused)
        new = await replaced(min(workers))
        before = cpu_ticks(new)
        assert await what_the_port_answers(sidecar, 60) == expected
        assert cpu_ticks(new) > before
    log = (tmp_path / "sidecar.log").read_text()
    assert "a worker started now runs the last good config" in log
    assert "Traceback" not in log


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.mark.slow
async def test_tls_listener_serves_https_and_tells_the_upstream(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    seen: list[str] = []
    upstream_app = web.Application()

    async def page(request: web.Request) -> web.Response:
        seen.append(request.headers["X-Forwarded-Proto"])
        return web.Response(text="ok")

    upstream_app.router.add_get("/", page)
    upstream = await aiohttp_server(upstream_app)
    cert_file, key_file = self_signed(tmp_path)
    tls = {"listen": {"tls": {"cert_file": str(cert_file), "key_file": str(key_file)}}}
    with run_sidecar(tmp_path, f"http://127.0.0.1:{upstream.port}", **tls) as sidecar:
        async with aiohttp.ClientSession() as session:
            url = f"https://127.0.0.1:{sidecar.port}/"
            async with session.get(url, ssl=False) as response:
                assert response.status == 200
    assert seen == ["https"]


@pytest.mark.slow
async def test_a_compressed_request_body_is_forwarded_as_sent(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    import gzip

    received: list[tuple[str | None, bytes]] = []
    upstream_app = web.Application()

    async def upload(request: web.Request) -> web.Response:
        received.append((request.headers.get("Content-Encoding"), await request.content.read()))
        return web.Response(text="ok")

    upstream_app.router.add_post("/upload", upload)
    # The upstream must not inflate it either, to compare bytes.
    upstream = await aiohttp_server(upstream_app, auto_decompress=False)
    body = gzip.compress(b"payload " * 300)
    with run_sidecar(tmp_path, f"http://127.0.0.1:{upstream.port}") as sidecar:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                sidecar.url + "/upload", data=body, headers={"Content-Encoding": "gzip"}
            ) as response:
                assert response.status == 200
    assert received == [("gzip", body)]


@pytest.mark.slow
async def test_sigterm_drains_an_upload_and_closes_websockets_with_1001(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream_app = web.Application()
    received: list[int] = []

    async def upload(request: web.Request) -> web.Response:
        received.append(len(await request.read()))
        return web.Response(text="stored")

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    upstream_app.router.add_post("/upload", upload)
    upstream_app.router.add_get("/ws", socket)
    upstream = await aiohttp_server(upstream_app)
    with run_sidecar(
        tmp_path, f"http://127.0.0.1:{upstream.port}", listen={"drain_timeout": "2s"}
    ) as sidecar:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(sidecar.url.replace("http", "ws") + "/ws")
            go_on = asyncio.Event()

            async def slow_body() -> Any:
                yield b"x" * 1000
                await go_on.wait()
                yield b"y" * 1000

            upload_task = asyncio.ensure_future(
                session.post(sidecar.url + "/upload", data=slow_body())
            )
            await asyncio.sleep(0.3)
            started = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            go_on.set()  # the upload goes on while the sidecar drains
            uploaded = await upload_task
            assert uploaded.status == 200
            assert await uploaded.text() == "stored"
            closing = await ws.receive(timeout=10)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert closing.data == 1001
            await ws.close()
        assert await asyncio.to_thread(sidecar.proc.wait, 15) == 0
        assert time.monotonic() - started < 6  # drain 2 s + the last grace, not twice that
    assert received == [2000]
