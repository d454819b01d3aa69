"""The admin API: security settings, audit log, MFA resets, with step-up and CSRF."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from sidecar.app import SETTINGS
from sidecar.config import parse_config
from sidecar.operations import audit_verify
from tests.conftest import raw_config
from tests.mfa.support import XHR, Client, csrf, enroll_totp, login

Factory = Callable[..., Awaitable[Client]]


async def stepped_up_admin(sidecar: Factory, user: str = "bob", **sections: Any) -> Client:
    client = await sidecar(**sections)
    login(client, user)
    await enroll_totp(client)  # enrollment verifies the session: stepped up for 10 minutes
    return client


async def get_settings(client: Client) -> dict[str, Any]:
    response = await client.get("/mfa/api/admin/security")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def put_settings(client: Client, **changes: Any) -> Any:
    return await client.put(
        "/mfa/api/admin/security",
        json=changes,
        headers={"X-CSRF-Token": await csrf(client)},
    )


async def test_admin_changes_policy_and_lists_and_they_apply(
    sidecar: Factory, console: TestServer
) -> None:
    admin = await stepped_up_admin(sidecar)
    before = await get_settings(admin)
    assert before["mfa_policy"] == "optional"
    assert before["managed_by"] == "store"
    response = await put_settings(
        admin,
        mfa_policy="all",
        grace_period_seconds=0,
        ip_denylist=["203.0.113.0/24", "2001:db8::1"],
        version=before["version"],
    )
    assert response.status == 200, await response.text()
    after = await response.json()
    assert after["mfa_policy"] == "all"
    assert after["ip_denylist"] == ["203.0.113.0/24", "2001:db8::1/128"]
    assert after["version"] == before["version"] + 1
    assert after["updated_by"] == "u-bob"
    # Enforced at once on this replica: carol (a member) now needs MFA.
    member = await sidecar()
    login(member, "carol")
    blocked = await member.get("/reports", headers=XHR)
    assert blocked.status == 403
    assert (await blocked.json())["error"] == "mfa_setup_required"


async def test_member_gets_403_and_unverified_admin_gets_step_up(sidecar: Factory) -> None:
    member = await sidecar()
    login(member, "carol")
    refused = await member.get("/mfa/api/admin/security")
    assert refused.status == 403
    assert (await refused.json())["error"] == "forbidden"
    admin = await sidecar()
    login(admin, "bob")
    step_up = await admin.get("/mfa/api/admin/security")
    assert step_up.status == 403
    body = await step_up.json()
    assert body["error"] == "step_up_required"
    assert body["location"].startswith("/mfa/verify")
    assert (await admin.get("/mfa/api/admin/audit")).status == 403


async def test_every_bad_cidr_line_is_reported(sidecar: Factory) -> None:
    admin = await stepped_up_admin(sidecar)
    version = (await get_settings(admin))["version"]
    response = await put_settings(
        admin,
        ip_allowlist="10.0.0.0/8\n\n# office\n10.0.0.0/33\n192.168.1.1/24\nnonsense",
        ip_denylist=["::1", 42],
        version=version,
    )
    assert response.status == 400
    errors = (await response.json())["errors"]
    assert [(e["field"], e["line"], e["value"]) for e in errors] == [
        ("ip_allowlist", 4, "10.0.0.0/33"),
        ("ip_allowlist", 5, "192.168.1.1/24"),
        ("ip_allowlist", 6, "nonsense"),
        ("ip_denylist", 2, 42),
    ]
    assert "host bits" in errors[1]["reason"]
    assert (await get_settings(admin))["version"] == version  # nothing saved


async def test_self_lockout_needs_confirmation(sidecar: Factory) -> None:
    admin = await stepped_up_admin(sidecar)
    version = (await get_settings(admin))["version"]
    refused = await put_settings(admin, ip_allowlist=["10.0.0.0/8"], version=version)
    assert refused.status == 409
    body = await refused.json()
    assert body["error"] == "would_lock_you_out"
    assert body["client_ip"] == "127.0.0.1"
    denied = await put_settings(admin, ip_denylist=["127.0.0.0/8"], version=version)
    assert denied.status == 409
    confirmed = await put_settings(
        admin, ip_allowlist=["10.0.0.0/8"], version=version, confirm_lockout=True
    )
    assert confirmed.status == 200
    assert (await admin.get("/mfa/api/status")).status == 403  # locked out, as confirmed


async def test_concurrent_edits_conflict(sidecar: Factory) -> None:
    admin = await stepped_up_admin(sidecar)
    version = (await get_settings(admin))["version"]
    first, second = await asyncio.gather(
        put_settings(admin, mfa_policy="admins", version=version),
        put_settings(admin, mfa_policy="all", version=version),
    )
    assert sorted([first.status, second.status]) == [200, 409]
    loser = first if first.status == 409 else second
    assert (await loser.json())["error"] == "conflict"


async def test_managed_by_config_is_read_only(sidecar: Factory) -> None:
    admin = await stepped_up_admin(sidecar, security={"managed_by": "config"})
    current = await get_settings(admin)
    assert current["managed_by"] == "config"
    response = await put_settings(admin, mfa_policy="all", version=current["version"])
    assert response.status == 409
    assert (await response.json())["error"] == "managed_by_config"


async def test_audit_log_newest_first_filtered_and_exported(
    sidecar: Factory, tmp_path: Path
) -> None:
    admin = await stepped_up_admin(sidecar)
    version = (await get_settings(admin))["version"]
    await put_settings(admin, mfa_policy="admins", version=version)
    entries = (await (await admin.get("/mfa/api/admin/audit?limit=50")).json())["entries"]
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs, reverse=True)
    changed = [e for e in entries if e["action"] == "security.settings.changed"]
    assert changed[0]["details"]["changes"]["mfa_policy"] == {"old": "optional", "new": "admins"}
    assert changed[0]["actor"] == "u-bob"
    only = await admin.get("/mfa/api/admin/audit?action=mfa.enrolled")
    assert {e["action"] for e in (await only.json())["entries"]} == {"mfa.enrolled"}
    csv_export = await admin.get("/mfa/api/admin/audit?format=csv")
    assert csv_export.content_type == "text/csv"
    assert "security.settings.changed" in await csv_export.text()
    # The same records are in the file, chained: seq and hash on every line.
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))


async def test_admin_reset_removes_a_members_methods(
    sidecar: Factory, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    admin = await stepped_up_admin(sidecar)
    member = await aiohttp_client(admin.server)  # same replica: its caches see the reset
    login(member, "carol")
    await enroll_totp(member)
    response = await admin.post(
        "/mfa/api/admin/users/u-carol/reset-mfa", headers={"X-CSRF-Token": await csrf(admin)}
    )
    assert response.status == 200
    assert (await response.json())["reset"] is True
    status = await (await member.get("/mfa/api/status")).json()
    assert status["enrolled"] is False
    assert status["verified"] is False


async def test_audit_chain_verifies_and_tampering_is_named(
    sidecar: Factory, tmp_path: Path
) -> None:
    import sqlite3

    admin = await stepped_up_admin(sidecar)
    version = (await get_settings(admin))["version"]
    await put_settings(admin, mfa_policy="admins", version=version)
    config = parse_config(raw_config(tmp_path, "http://127.0.0.1:1"), env={})
    ok, message = await audit_verify(config)
    assert ok, message
    db = sqlite3.connect(tmp_path / "state.db")
    count = db.execute("select count(*) from audit").fetchone()[0]
    assert count >= 3
    db.execute("update audit set outcome = 'failure' where seq = 2")
    db.commit()
    ok, message = await audit_verify(config)
    assert not ok
    assert "record 2" in message
    db.execute("update audit set outcome = 'success' where seq = 2")
    db.execute("delete from audit where seq = 2")
    db.commit()
    ok, message = await audit_verify(config)
    assert not ok
    assert "record 3" in message
    db.close()


async def test_grace_preview_counts_known_users(sidecar: Factory) -> None:
    member = await sidecar()
    login(member, "carol")
    await member.get("/", headers=XHR)  # carol becomes a known user
    admin = await stepped_up_admin(sidecar)
    preview = await admin.get("/mfa/api/admin/security/preview?mfa_policy=all&grace_period=0s")
    counts = await preview.json()
    assert counts["enrolled"] == 1  # bob
    assert counts["blocked"] == 1  # carol: required under `all`, no grace
    settings = admin.app[SETTINGS]
    assert settings.current is not None


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_anonymous_admin_calls_are_401(sidecar: Factory, method: str) -> None:
    client = await sidecar()
    response = await client.request(method, "/mfa/api/admin/security")
    assert response.status == 401


async def test_security_page_shows_members_their_own_mfa_only(sidecar: Factory) -> None:
    member = await sidecar()
    login(member, "carol")
    page = await member.get("/mfa/security")
    assert page.status == 200
    text = await page.text()
    assert "Your sign-in methods" in text
    assert "IP restrictions" not in text
    assert "Open audit log" not in text
    assert (await member.get("/mfa/audit", allow_redirects=False)).status == 403


async def test_security_page_gives_a_stepped_up_admin_the_org_settings(sidecar: Factory) -> None:
    admin = await stepped_up_admin(sidecar)
    text = await (await admin.get("/mfa/security")).text()
    for heading in ("IP restrictions", "Open audit log", "evaluated first"):
        assert heading in text
    assert (await admin.get("/mfa/audit")).status == 200
    fresh = await sidecar()
    login(fresh, "bob")
    step_up = await fresh.get("/mfa/audit", allow_redirects=False)
    assert step_up.status == 303
    assert step_up.headers["Location"] == "/mfa/verify?next=/mfa/audit"


@pytest.mark.parametrize(
    "changes",
    [
        {"grace_period_seconds": float("inf")},
        {"grace_period_seconds": 1e300},
        {"grace_period": "9999999999999d"},
        {"grace_period_seconds": -1},
    ],
)
async def test_unusable_grace_periods_are_refused(
    sidecar: Factory, changes: dict[str, Any]
) -> None:
    admin = await stepped_up_admin(sidecar)
    version = (await get_settings(admin))["version"]
    body = json.dumps({**changes, "version": version})  # allows Infinity, as a client may
    response = await admin.put(
        "/mfa/api/admin/security",
        data=body,
        headers={"X-CSRF-Token": await csrf(admin), "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await get_settings(admin))["version"] == version


async def test_malformed_admin_input_is_a_4xx_never_a_500(sidecar: Factory) -> None:
    admin = await stepped_up_admin(sidecar)
    token = {"X-CSRF-Token": await csrf(admin), "Content-Type": "application/json"}
    nested = await admin.put("/mfa/api/admin/security", data="[" * 100_000, headers=token)
    assert nested.status == 400
    for query in ("before=99999999999999999999999", "before=-1", "limit=x"):
        assert (await admin.get(f"/mfa/api/admin/audit?{query}")).status == 400
    code = await admin.post("/mfa/api/verify/totp", data="[" * 100_000, headers=token)
    assert code.status == 400


@pytest.mark.parametrize("target", ["%20", "%00", "a%0Ab"])
async def test_reset_refuses_what_is_not_a_user_id(sidecar: Factory, target: str) -> None:
    admin = await stepped_up_admin(sidecar)
    response = await admin.post(
        f"/mfa/api/admin/users/{target}/reset-mfa",
        headers={"X-CSRF-Token": await csrf(admin)},
    )
    assert response.status == 400


async def test_audit_verify_notices_records_cut_off_at_the_end(
    sidecar: Factory, tmp_path: Path
) -> None:
    import sqlite3

    await stepped_up_admin(sidecar)  # enrollment and verification write audit records
    config = parse_config(raw_config(tmp_path, "http://127.0.0.1:1"), env={})
    ok, message = await audit_verify(config)
    assert ok, message
    db = sqlite3.connect(tmp_path / "state.db")
    last = db.execute("select max(seq) from audit").fetchone()[0]
    db.execute("delete from audit where seq = ?", (last,))
    db.commit()
    db.close()
    ok, message = await audit_verify(config)
    assert not ok
    assert f"seq {last}" in message
