"""Exemptions a browser session shares: named by ``token_warnings``, printed by
``sidecar check-config`` and logged when the sidecar starts."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet

from sidecar.cli import EXIT_OK, main
from sidecar.config import Config, parse_config
from sidecar.identity.warnings import token_warnings
from tests.conftest import raw_config
from tests.identity.tokens import AUDIENCE, ISSUER, jwt_section
from tests.process import run_sidecar

SKIPS = "skips the MFA gate (a phished password is enough to use the console's API)"
NO_TOKENS_EXEMPT = (
    "mfa.enforce_on_tokens: false: every request authenticated only by Authorization: Bearer, "
    f"a browser's own session token sent that way included, {SKIPS}; "
)
RULE_ON_AUD = {"claim": "aud", "value": AUDIENCE}


def config(mfa: dict[str, Any] | None = None, **identity: Any) -> Config:
    key = Fernet.generate_key().decode()
    mfa_section = {"rp_id": "localhost", "origin": "http://localhost", **(mfa or {})}
    return parse_config(
        {
            "identity": identity,
            "mfa": {**mfa_section, "session": {"secret_keys": [key]}},
            "storage": {"encryption_key": key},
        },
        env={},
    )


CASES: dict[str, tuple[Any, list[str]]] = {
    "the defaults": ({}, []),
    "rules that only API tokens meet": (
        {
            "introspect": {"api_token": {"field": "credential", "value": "api_token"}},
            "jwt": jwt_section(api_token={"claim": "aud", "value": "console-api"}),
        },
        [],
    ),
    "every bearer token exempt, introspect": (
        {"mfa": {"enforce_on_tokens": False}},
        [
            NO_TOKENS_EXEMPT + "recognise API tokens by a field of the console's answer with "
            "identity.introspect.api_token instead"
        ],
    ),
    "every bearer token exempt, jwt": (
        {"mfa": {"enforce_on_tokens": False}, "source": "jwt", "jwt": jwt_section()},
        [NO_TOKENS_EXEMPT + "recognise API tokens by a claim with identity.jwt.api_token instead"],
    ),
    "every bearer token exempt, headers": (
        {"mfa": {"enforce_on_tokens": False}, "source": "headers"},
        [
            NO_TOKENS_EXEMPT + "the headers source cannot recognise API tokens: keep it only if "
            "the auth proxy never accepts a browser's session token as a bearer token"
        ],
    ),
    "jwt: aud is the configured audience, browser tokens in a cookie": (
        {"source": "jwt", "jwt": jwt_section(api_token=RULE_ON_AUD)},
        [
            "identity.jwt.api_token: claim aud = 'console' is identity.jwt.audience, which every "
            "accepted token carries: every header token, the browser's session token "
            f"(identity.jwt.cookie) sent as Authorization: Bearer included, {SKIPS}"
        ],
    ),
    "jwt: aud is the configured audience, tokens in the header only": (
        {"source": "jwt", "jwt": jwt_section(cookie=None, api_token=RULE_ON_AUD)},
        [
            "identity.jwt.api_token: claim aud = 'console' is identity.jwt.audience, which every "
            f"accepted token carries: every token, browser sessions included, {SKIPS}"
        ],
    ),
    "jwt: iss is the configured issuer": (
        {"source": "jwt", "jwt": jwt_section(api_token={"claim": "iss", "value": ISSUER})},
        [
            f"identity.jwt.api_token: claim iss = '{ISSUER}' is identity.jwt.issuer, which "
            "every accepted token carries: every header token, the browser's session token "
            f"(identity.jwt.cookie) sent as Authorization: Bearer included, {SKIPS}"
        ],
    ),
    "jwt: aud while no audience is configured": (
        {"source": "jwt", "jwt": jwt_section(audience=None, api_token=RULE_ON_AUD)},
        [],
    ),
    "jwt: the role claim": (
        {
            "source": "jwt",
            "jwt": jwt_section(api_token={"claim": "role", "value": "service"}),
        },
        [
            "identity.jwt.api_token: claim 'role' is identity.jwt.role_claim, which describes "
            "the user, not the credential: that user's browser session token sent as "
            f"Authorization: Bearer {SKIPS}"
        ],
    ),
    "introspect: the configured id field": (
        {
            "introspect": {
                "id_field": "user.id",
                "api_token": {"field": "user.id", "value": "u-robot"},
            }
        },
        [
            "identity.introspect.api_token: field 'user.id' is identity.introspect.id_field, "
            "which describes the user, not the credential: that user's browser session token "
            f"sent as Authorization: Bearer {SKIPS}"
        ],
    ),
    "a rule of another source is not judged": (
        {"jwt": jwt_section(api_token=RULE_ON_AUD)},
        [],
    ),
}


@pytest.mark.parametrize(("sections", "expected"), CASES.values(), ids=CASES.keys())
def test_token_warnings(sections: dict[str, Any], expected: list[str]) -> None:
    assert token_warnings(config(**sections)) == expected


def test_check_config_prints_the_warnings_and_still_accepts_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = raw_config(
        tmp_path,
        "http://127.0.0.1:3000",
        identity={"source": "jwt", "jwt": jwt_section(api_token=RULE_ON_AUD)},
        mfa={"enforce_on_tokens": False},
    )
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check-config", str(path)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: ok ")
    lines = [line for line in err.splitlines() if SKIPS in line]
    assert [line.split(": ")[:2] for line in lines] == [
        ["warning", "mfa.enforce_on_tokens"],
        ["warning", "identity.jwt.api_token"],
    ]
    assert all(line.startswith("warning: ") for line in err.splitlines())


async def test_the_sidecar_logs_the_warnings_when_it_starts(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    upstream = await aiohttp_server(web.Application())
    with run_sidecar(
        tmp_path, f"http://127.0.0.1:{upstream.port}", mfa={"enforce_on_tokens": False}
    ):
        log = (tmp_path / "sidecar.log").read_text()
    (line,) = [json.loads(line) for line in log.splitlines() if "mfa.enforce_on_tokens" in line]
    assert line["level"] == "warning"
    assert line["msg"].startswith("config warning: mfa.enforce_on_tokens: false: ")
