"""Two sidecar processes on one PostgreSQL: a change made through one is enforced by the other."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pyotp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.mfa.support import stub_console
from tests.process import run_sidecar
from tests.store.support import postgres_url


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    base = URL(postgres_url())
    name = f"sidecar_t_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(str(base))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield str(base.with_path("/" + name))
    finally:
        admin = await asyncpg.connect(str(base))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


ADMIN = {"X-Forwarded-For": "192.0.2.10"}
CLIENT = {"X-Forwarded-For": "203.0.113.9", "Accept": "application/json"}


@pytest.mark.postgres
@pytest.mark.slow
async def test_a_change_through_one_replica_is_enforced_by_the_other_within_5_seconds(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    console = await aiohttp_server(stub_console())
    async with fresh_postgres_database() as database:
        common = {
            "storage": {"url": database},
            "network": {"trusted_proxies": ["127.0.0.0/8"]},
        }
        first_dir, second_dir = tmp_path / "a", tmp_path / "b"
        first_dir.mkdir()
        second_dir.mkdir()
        url = f"http://127.0.0.1:{console.port}"
        with run_sidecar(first_dir, url, **common) as first:
            # The second replica must share the data key to read what the first wrote.
            written = yaml.safe_load((first_dir / "sidecar.yaml").read_text())
            key = written["storage"]["encryption_key"]
            with run_sidecar(
                second_dir, url, **{**common, "storage": {"url": database, "encryption_key": key}}
            ) as second:
                jar = aiohttp.CookieJar(unsafe=True)
                async with aiohttp.ClientSession(cookie_jar=jar) as admin:
                    jar.update_cookies({"console": "bob"}, URL(first.url))
                    status = await (
                        await admin.get(first.url + "/mfa/api/status", headers=ADMIN)
                    ).json()
                    token = {"X-CSRF-Token": status["csrf_token"], **ADMIN}
                    begun = await (
                        await admin.post(first.url + "/mfa/api/totp/begin", headers=token)
                    ).json()
                    finished = await admin.post(
                        first.url + "/mfa/api/totp/finish",
                        json={"code": pyotp.TOTP(begun["secret"]).now()},
                        headers=token,
                    )
                    assert finished.status == 200, await finished.text()
                    token["X-CSRF-Token"] = (await finished.json())["csrf_token"]
                    settings = await (
                        await admin.get(first.url + "/mfa/api/admin/security", headers=ADMIN)
                    ).json()
                    async with aiohttp.ClientSession() as probe:
                        before = await probe.get(second.url + "/page", headers=CLIENT)
                        assert before.status == 200
                        changed = await admin.put(
                            first.url + "/mfa/api/admin/security",
                            json={
                                "ip_denylist": ["203.0.113.0/24"],
                                "version": settings["version"],
                            },
                            headers=token,
                        )
                        assert changed.status == 200, await changed.text()
                        started = time.monotonic()
                        while True:
                            response = await probe.get(second.url + "/page", headers=CLIENT)
                            if response.status == 403:
                                break
                            assert time.monotonic() - started < 5.0, "not enforced in 5 s"
                            await asyncio.sleep(0.1)
