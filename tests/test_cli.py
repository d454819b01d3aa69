"""The ``sidecar`` command line: exit codes and what operators read on the terminal.

Most cases call ``sidecar.cli.main`` in-process; a few run ``python -m sidecar`` for real, to
cover the entry point and prove no traceback ever reaches the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from sidecar.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, main
from tests.process import run_sidecar

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"

BAD_CONFIG = """\
listen: {prot: 8080}
workers: 0
security:
  ip_allowlist: [10.0.0.0/8, 192.0.2.1, '2001:db8::/32', 10.0.0.0/33]
"""
BAD_CONFIG_PROBLEMS = [
    "  listen.prot: unknown key",
    "  workers: 0: input should be greater than or equal to 1",
    "  security.ip_allowlist[3]: '10.0.0.0/33' is not a CIDR",
]


def _secrets() -> dict[str, str]:
    return {
        "SIDECAR_SESSION_KEY": Fernet.generate_key().decode(),
        "SIDECAR_DATA_KEY": Fernet.generate_key().decode(),
    }


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The two secrets in the environment, as a deployment provides them."""
    env = _secrets()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def no_secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDECAR_SESSION_KEY", raising=False)
    monkeypatch.delenv("SIDECAR_DATA_KEY", raising=False)


def sidecar(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m sidecar ARGS`` in a clean environment plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
        check=False,
    )


# --- check-config --------------------------------------------------------------------------


def test_check_config_accepts_the_example(
    secrets_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(EXAMPLE)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == (
        f"{EXAMPLE}: ok (upstream http://127.0.0.1:3000, 0 allowlist and 0 denylist rules, "
        "MFA policy optional)\n"
    )
    # The defaults listen on every interface without a trusted proxy: worth one warning.
    assert err.startswith("warning: network.trusted_proxies: [] while listen.host '0.0.0.0' ")
    assert len(err.splitlines()) == 1


def test_check_config_lists_every_problem_on_stderr(
    tmp_path: Path, secrets_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, encoding="utf-8")
    assert main(["check-config", str(path)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"{path}: invalid configuration:", *BAD_CONFIG_PROBLEMS]


def test_check_config_names_the_missing_environment_variables(
    no_secrets_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(EXAMPLE)]) == EXIT_CONFIG
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  mfa.session.secret_keys[0]: environment variable SIDECAR_SESSION_KEY is not set",
        "  storage.encryption_key: environment variable SIDECAR_DATA_KEY is not set",
    ]


def test_check_config_on_a_missing_file(
    tmp_path: Path, secrets_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["check-config", str(path)]) == EXIT_CONFIG
    assert f"{path}: cannot read: No such file or directory" in capsys.readouterr().err


def test_run_refuses_an_invalid_config(
    tmp_path: Path, secrets_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, encoding="utf-8")
    assert main(["run", "--config", str(path)]) == EXIT_CONFIG
    assert capsys.readouterr().err.splitlines()[1:] == BAD_CONFIG_PROBLEMS


def test_check_config_as_a_real_process_accepts_the_example() -> None:
    result = sidecar("check-config", str(EXAMPLE), env=_secrets())
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: ok ")


INSECURE_CONFIG = """\
listen: {host: 127.0.0.1}
network: {trusted_proxies: ['::/0', 10.0.0.0/8]}
mfa: {exempt_paths: [/logout, /], verify_every: 30d}
"""


def test_check_config_as_a_real_process_refuses_a_setting_that_disables_a_protection(
    tmp_path: Path,
) -> None:
    path = tmp_path / "insecure.yaml"
    path.write_text(INSECURE_CONFIG, encoding="utf-8")
    result = sidecar("check-config", str(path), env=_secrets())
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: invalid configuration:"
    assert [line.split(": ", 1)[0] for line in lines[1:]] == [
        "  network.trusted_proxies[0]",
        "  mfa.exempt_paths[1]",
    ]
    assert lines[1].startswith("  network.trusted_proxies[0]: '::/0' covers every IPv6 address")
    assert lines[1].endswith("; to accept this, add trust_any_proxy to acknowledge_insecure")
    assert lines[2].startswith("  mfa.exempt_paths[1]: '/' exempts every path")
    assert lines[2].endswith("; to accept this, add exempt_everything to acknowledge_insecure")


def test_check_config_as_a_real_process_accepts_it_acknowledged_and_warns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "acknowledged.yaml"
    path.write_text(
        INSECURE_CONFIG + "acknowledge_insecure: [exempt_everything, trust_any_proxy]\n",
        encoding="utf-8",
    )
    result = sidecar("check-config", str(path), env=_secrets())
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith(f"{path}: ok ")
    warnings = result.stderr.splitlines()
    assert [line.split(": ", 2)[:2] for line in warnings] == [
        ["warning", "network.trusted_proxies[0]"],
        ["warning", "mfa.exempt_paths[1]"],
        ["warning", "mfa.verify_every"],
    ]
    assert warnings[0].endswith("(accepted by acknowledge_insecure: trust_any_proxy)")
    assert warnings[1].endswith("(accepted by acknowledge_insecure: exempt_everything)")
    assert warnings[2] == (
        "warning: mfa.verify_every: 30d is more than 7d: a browser left signed in, or a copied "
        "session cookie, passes the MFA gate that long"
    )


def test_run_refuses_a_setting_that_disables_a_protection(
    tmp_path: Path, secrets_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "insecure.yaml"
    path.write_text(INSECURE_CONFIG, encoding="utf-8")
    assert main(["run", "--config", str(path)]) == EXIT_CONFIG
    problems = capsys.readouterr().err.splitlines()[1:]
    assert [line.split(": ", 1)[0] for line in problems] == [
        "  network.trusted_proxies[0]",
        "  mfa.exempt_paths[1]",
    ]


def test_run_logs_each_warning_once_at_start_up(tmp_path: Path) -> None:
    """Two workers, one start: each warning is logged once, by the process that read the
    file, at warning level (the level run_sidecar sets, so nothing quieter gets through)."""
    with run_sidecar(
        tmp_path,
        "http://127.0.0.1:1",
        workers=2,
        network={"trusted_proxies": ["0.0.0.0/0"]},
        mfa={"verify_every": "8d"},
        acknowledge_insecure=["trust_any_proxy"],
    ):
        pass
    records = [
        json.loads(line)
        for line in (tmp_path / "sidecar.log").read_text().splitlines()
        if line.startswith("{")
    ]
    warnings = [r for r in records if r["logger"] == "sidecar.config"]
    assert [(r["level"], r["trigger"], r["msg"].split(": ", 2)[:2]) for r in warnings] == [
        ("warning", "start", ["config warning", "network.trusted_proxies[0]"]),
        ("warning", "start", ["config warning", "mfa.verify_every"]),
    ]
    assert warnings[0]["msg"].endswith("(accepted by acknowledge_insecure: trust_any_proxy)")


def test_check_config_as_a_real_process_refuses_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, encoding="utf-8")
    result = sidecar("check-config", str(path), env=_secrets())
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{path}: invalid configuration:", *BAD_CONFIG_PROBLEMS]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("? [a, b]\n: c\n", ":1:3: invalid YAML:", id="list-as-key"),
        pytest.param("[" * 5000 + "]" * 5000, ": invalid YAML: nested too deeply", id="deep"),
        pytest.param("security: {grace_period: 1" + "0" * 400 + "}\n", "is too long", id="huge"),
    ],
)
def test_check_config_as_a_real_process_never_shows_a_traceback(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")
    result = sidecar("check-config", str(path), env=_secrets())
    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stdout + result.stderr
    assert expected in result.stderr


# --- keys generate -------------------------------------------------------------------------


def test_keys_generate_prints_a_fresh_fernet_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate"]) == EXIT_OK
    first = capsys.readouterr().out
    assert main(["keys", "generate"]) == EXIT_OK
    second = capsys.readouterr().out
    assert first.endswith("\n")
    assert first != second
    key = first.strip()
    assert Fernet(key).decrypt(Fernet(key).encrypt(b"x")) == b"x"


# --- ip explain ----------------------------------------------------------------------------


@pytest.fixture
def ip_config(tmp_path: Path) -> Path:
    key = Fernet.generate_key().decode()
    path = tmp_path / "ip.yaml"
    path.write_text(
        f"""\
network:
  trusted_proxies: [10.0.0.0/8, "fd00::/8"]
security:
  ip_allowlist: [203.0.113.0/24, "2001:db8::/32"]
  ip_denylist: [203.0.113.66, 198.51.100.0/24]
mfa: {{session: {{secret_keys: [{key}]}}}}
storage: {{encryption_key: {key}}}
""",
        encoding="utf-8",
    )
    return path


XFF = "X-Forwarded-For"

EXPLAIN = [
    pytest.param(
        ["198.51.100.7"],
        EXIT_FAILURE,
        [
            "client address: 198.51.100.7",
            "denylist (2 rules, checked first): matches 198.51.100.0/24",
            "decision: denied_ip (refused with 403)",
        ],
        id="denylisted",
    ),
    pytest.param(
        ["203.0.113.5"],
        EXIT_OK,
        [
            "denylist (2 rules, checked first): no match",
            "allowlist (2 rules): matches 203.0.113.0/24",
            "decision: allowed",
        ],
        id="allowlisted",
    ),
    pytest.param(
        ["2001:db8::1"],
        EXIT_OK,
        ["allowlist (2 rules): matches 2001:db8::/32", "decision: allowed"],
        id="allowlisted-ipv6",
    ),
    pytest.param(
        ["192.0.2.1"],
        EXIT_FAILURE,
        ["allowlist (2 rules): no match", "decision: not_allowlisted (refused with 403)"],
        id="not-on-the-allowlist",
    ),
    pytest.param(
        ["203.0.113.66"],
        EXIT_FAILURE,
        [
            "denylist (2 rules, checked first): matches 203.0.113.66/32",
            "allowlist (2 rules): matches 203.0.113.0/24",
            "decision: denied_ip (refused with 403: "
            "the denylist wins even though the allowlist matches)",
        ],
        id="on-both-lists",
    ),
    pytest.param(
        ["::ffff:198.51.100.7"],
        EXIT_FAILURE,
        ["matches 198.51.100.0/24", "decision: denied_ip"],
        id="ipv4-mapped-matches-ipv4-rules",
    ),
    pytest.param(
        ["203.0.113.5", "--via", "10.1.2.3", "--header", f"{XFF}: 203.0.113.5, 192.0.2.1"],
        EXIT_FAILURE,
        [
            "TCP peer 10.1.2.3: trusted proxy (network.trusted_proxies 10.0.0.0/8)",
            "client address: 192.0.2.1",
            "(note: that is not 203.0.113.5, the address you asked about)",
            "decision: not_allowlisted",
        ],
        id="trusted-proxy-spoofed-leftmost-entry",
    ),
    pytest.param(
        ["203.0.113.5", "--via", "10.1.2.3", "--header", f"{XFF}: 192.0.2.1, 10.9.9.9"],
        EXIT_FAILURE,
        ["client address: 192.0.2.1", "decision: not_allowlisted"],
        id="trusted-proxy-chain-skipped",
    ),
    pytest.param(
        ["203.0.113.5", "--via", "fd00::1", "--header", "x-forwarded-for: [2001:db8::5]:443"],
        EXIT_OK,
        ["trusted proxy (network.trusted_proxies fd00::/8)", "client address: 2001:db8::5"],
        id="trusted-ipv6-proxy-bracketed-entry",
    ),
    pytest.param(
        [
            "203.0.113.5",
            "--via",
            "10.1.2.3",
            "--header",
            f"{XFF}: 192.0.2.1",
            "--header",
            f"{XFF}: 203.0.113.5",
        ],
        EXIT_OK,
        ["client address: 203.0.113.5", "decision: allowed"],
        id="several-header-lines-read-as-one-list",
    ),
    pytest.param(
        ["203.0.113.5", "--via", "10.1.2.3"],
        EXIT_OK,
        [f"  {XFF}: 203.0.113.5", "client address: 203.0.113.5", "decision: allowed"],
        id="trusted-proxy-header-synthesized",
    ),
    pytest.param(
        ["192.0.2.1", "--via", "192.0.2.1", "--header", f"{XFF}: 203.0.113.5"],
        EXIT_FAILURE,
        [
            "TCP peer 192.0.2.1: not a trusted proxy, so it is the client address",
            f"({XFF} from an untrusted peer is ignored and replaced)",
            "client address: 192.0.2.1",
            "decision: not_allowlisted",
        ],
        id="untrusted-peer-header-ignored",
    ),
    pytest.param(
        ["203.0.113.5", "--via", "10.1.2.3", "--header", f"{XFF}: 203.0.113.5, not-an-ip"],
        EXIT_FAILURE,
        [
            "client address: cannot be determined: malformed X-Forwarded-For entry 'not-an-ip'",
            "decision: denied_ip (refused with 403: an unreadable forwarded entry is never "
            "skipped)",
        ],
        id="malformed-entry-refused",
    ),
    pytest.param(
        ["203.0.113.5", "--via", "10.1.2.3", "--header", "X-Real-IP: 203.0.113.5"],
        EXIT_OK,
        ["note: header X-Real-IP ignored: network.client_ip_header is X-Forwarded-For"],
        id="other-header-ignored",
    ),
]


@pytest.mark.parametrize(("args", "code", "expected"), EXPLAIN)
def test_ip_explain(
    ip_config: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    expected: list[str],
) -> None:
    assert main(["ip", "explain", *args, "--config", str(ip_config)]) == code
    out = capsys.readouterr().out
    for line in expected:
        assert line in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["not-an-ip"], "'not-an-ip' is not an IP address", id="not-an-address"),
        pytest.param(
            ["192.0.2.1", "--via", "10.1.2.3", "--header", "X-Forwarded-For 192.0.2.1"],
            "write it as 'Name: value'",
            id="header-without-colon",
        ),
    ],
)
def test_ip_explain_refuses_bad_input(
    ip_config: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    assert main(["ip", "explain", *args, "--config", str(ip_config)]) == EXIT_CONFIG
    assert expected in capsys.readouterr().err


def test_ip_explain_refuses_an_invalid_config(
    tmp_path: Path, secrets_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, encoding="utf-8")
    assert main(["ip", "explain", "192.0.2.1", "--config", str(path)]) == EXIT_CONFIG
    assert "security.ip_allowlist[3]: '10.0.0.0/33' is not a CIDR" in capsys.readouterr().err


# --- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param([], "the following arguments are required: COMMAND", id="no-command"),
        pytest.param(["frobnicate"], "invalid choice: 'frobnicate'", id="unknown-command"),
        pytest.param(["ip"], "the following arguments are required: ACTION", id="no-action"),
        pytest.param(["check-config"], "the following arguments are required: FILE", id="no-file"),
        pytest.param(["ip", "explain", "192.0.2.1"], "--config", id="explain-without-config"),
    ],
)
def test_usage_errors_exit_2_with_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: sidecar")
    assert expected in err


def test_no_command_as_a_real_process() -> None:
    result = sidecar(env={})
    assert result.returncode == 2
    assert result.stderr.startswith("usage: sidecar")
    assert "Traceback" not in result.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("sidecar ")


def test_ip_explain_judges_by_the_live_lists_in_the_store(
    tmp_path: Path, secrets_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "live.yaml"
    path.write_text(
        f'storage: {{url: "sqlite:///{tmp_path}/state.db"}}\n'
        f'audit: {{file: "{tmp_path}/audit.jsonl"}}\n'
        "security: {ip_allowlist: [192.0.2.0/24]}\n",
        encoding="utf-8",
    )
    assert main(["ip", "explain", "10.1.2.3", "--config", str(path)]) == 1
    assert "not_allowlisted" in capsys.readouterr().out
    assert main(["security", "set", "--config", str(path), "--clear-allowlist"]) == 0
    capsys.readouterr()
    assert main(["ip", "explain", "10.1.2.3", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "IP lists from the store" in out
    assert "decision: allowed" in out


def test_check_config_and_run_refuse_a_jwt_key_the_provider_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Fernet.generate_key().decode()
    path = tmp_path / "jwt.yaml"
    path.write_text(
        f"""\
identity: {{source: jwt, jwt: {{algorithms: [HS256], key: "short"}}}}
mfa: {{session: {{secret_keys: [{key}]}}}}
storage: {{encryption_key: {key}}}
""",
        encoding="utf-8",
    )
    assert main(["check-config", str(path)]) == EXIT_CONFIG
    check = capsys.readouterr().err
    assert "identity.jwt.key" in check
    assert main(["run", "--config", str(path)]) == EXIT_CONFIG
    assert capsys.readouterr().err == check  # the same words, and no traceback
