"""One configuration per port: what a reload applies and what a replacement worker runs.

``running_config(started, current)`` is the file's current values with every restart-only
key kept from start-up. Each case changes one restart-only key and, in the same file, keys
that a reload applies (some of them siblings in the same section): the first must keep its
start-up value, the others must be taken, and nothing else may differ from the file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import IDENTITY_PROVIDER, LIVE, RESTART_ONLY, build_app, running_config
from sidecar.config import Config, ConfigError, parse_config
from sidecar.file_stamp import file_stamp
from sidecar.identity.introspect import IntrospectProvider
from sidecar.reload import Reloader
from sidecar.workers import RunningConfigs
from tests.conftest import deep_merge, raw_config

Client = TestClient[web.Request, web.Application]
Path_ = tuple[str, ...]


def restart_only_change(path: Path_, tmp_path: Path) -> dict[str, Any]:
    """A valid file change of the restart-only ``path`` (one case per RESTART_ONLY entry)."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("cert")
    key.write_text("key")
    other_key = "x" * 43 + "="
    changes: dict[Path_, dict[str, Any]] = {
        ("listen", "host"): {"listen": {"host": "127.0.0.2"}},
        ("listen", "port"): {"listen": {"port": 18181}},
        ("listen", "tls"): {"listen": {"tls": {"cert_file": str(cert), "key_file": str(key)}}},
        ("listen", "keepalive_timeout"): {"listen": {"keepalive_timeout": "5s"}},
        ("listen", "drain_timeout"): {"listen": {"drain_timeout": "2s"}},
        ("admin",): {"admin": {"port": 19191}},
        ("workers",): {"workers": 4},
        ("upstream",): {"upstream": {"url": "http://127.0.0.1:2"}},
        ("storage",): {"storage": {"url": f"sqlite:///{tmp_path / 'other.db'}"}},
        ("audit",): {"audit": {"file": str(tmp_path / "other.jsonl")}},
        ("mfa", "path_prefix"): {"mfa": {"path_prefix": "/security-keys"}},
        ("mfa", "session"): {
            "mfa": {"session": {"cookie_name": "other", "secret_keys": [other_key]}}
        },
    }
    return changes[path]


#: Reloadable keys changed in the same file, next to restart-only ones in their sections.
RELOADABLE_CHANGE: dict[str, Any] = {
    "listen": {"max_body_size": "1KiB", "header_timeout": "3s"},
    "network": {"trusted_proxies": ["10.0.0.0/8"]},
    "identity": {"introspect": {"path": "/api/whoami"}},
    "security": {"mfa_policy": "all", "ip_denylist": ["192.0.2.0/24"]},
    "mfa": {"exempt_paths": ["/public/"], "verify_every": "1h", "rp_name": "Changed"},
    "logging": {"level": "debug"},
}
RELOADABLE_PATHS: list[Path_] = [
    ("listen", "max_body_size"),
    ("listen", "header_timeout"),
    ("network", "trusted_proxies"),
    ("identity", "introspect", "path"),
    ("security",),
    ("mfa", "exempt_paths"),
    ("mfa", "verify_every"),
    ("mfa", "rp_name"),
    ("logging",),
]


def part(config: Config, path: Path_) -> object:
    value: object = config
    for name in path:
        value = getattr(value, name)
    return value


def without(dump: dict[str, Any], path: Path_) -> dict[str, Any]:
    out = dict(dump)
    if len(path) == 1:
        out.pop(path[0])
    else:
        out[path[0]] = without(out[path[0]], path[1:])
    return out


def test_every_restart_only_key_has_a_case(tmp_path: Path) -> None:
    for path in RESTART_ONLY:
        assert restart_only_change(path, tmp_path), path


@pytest.mark.parametrize("path", RESTART_ONLY, ids=[".".join(p) for p in RESTART_ONLY])
def test_a_restart_only_key_keeps_its_start_up_value_and_reloadable_keys_are_taken(
    tmp_path: Path, path: Path_
) -> None:
    raw = raw_config(tmp_path, "http://127.0.0.1:1")
    started = parse_config(raw, env={})
    changed = deep_merge(deep_merge(raw, restart_only_change(path, tmp_path)), RELOADABLE_CHANGE)
    current = parse_config(changed, env={})
    assert part(current, path) != part(started, path)  # the case does change it

    running = running_config(started, current)

    assert part(running, path) == part(started, path)
    for reloadable in RELOADABLE_PATHS:
        assert part(running, reloadable) == part(current, reloadable) != part(started, reloadable)
    # Nothing else differs from the file...
    assert without(running.model_dump(), path) == without(current.model_dump(), path)
    # ...and a later reload of the same file keeps the same running config.
    assert running_config(running, current) == running


def test_a_file_without_restart_only_changes_runs_as_written(tmp_path: Path) -> None:
    raw = raw_config(tmp_path, "http://127.0.0.1:1")
    started = parse_config(raw, env={})
    current = parse_config(deep_merge(raw, RELOADABLE_CHANGE), env={})
    assert running_config(started, current) is current


def test_a_combination_that_breaks_a_rule_between_keys_is_refused(tmp_path: Path) -> None:
    # The file renames the sidecar's cookie (restart-only) and names the old name as the
    # auth proxy's cookie (reloadable): fine as written, but the running sidecar still uses
    # the old name, and every verification would then end itself.
    raw = raw_config(tmp_path, "http://127.0.0.1:1")
    started = parse_config(raw, env={})
    changed = deep_merge(
        raw,
        {
            "mfa": {"session": {"cookie_name": "console_mfa"}},
            "identity": {"source": "headers", "headers": {"session_cookie": "sidecar_session"}},
        },
    )
    current = parse_config(changed, env={})
    with pytest.raises(ConfigError) as refused:
        running_config(started, current)
    (problem,) = refused.value.problems
    assert "identity.headers.session_cookie names the sidecar's own cookie" in problem
    assert "with mfa.session as the sidecar started" in problem


async def test_a_reload_keeps_restart_only_values_everywhere(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    raw = raw_config(tmp_path, "http://127.0.0.1:1")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    client = await aiohttp_client(build_app(parse_config(raw, env={})))
    app = client.app
    # A new upstream and prefix (restart-only) with a new identity section (reloadable): the
    # new identity provider must still ask the upstream the proxy forwards to.
    changed = deep_merge(
        raw,
        {
            "upstream": {"url": "http://127.0.0.1:2"},
            "mfa": {"path_prefix": "/other", "exempt_paths": ["/public/"]},
            "identity": {"introspect": {"path": "/api/whoami"}},
        },
    )
    path.write_text(yaml.safe_dump(changed))
    assert await Reloader(app, path).reload("test") is True
    running = app[LIVE].config
    assert running.upstream.url == "http://127.0.0.1:1"
    assert running.mfa.path_prefix == "/mfa"
    assert running.mfa.exempt_paths == ["/public/"]
    provider = app[IDENTITY_PROVIDER].provider
    assert isinstance(provider, IntrospectProvider)
    assert provider._url == "http://127.0.0.1:1/api/whoami"
    # The sidecar's routes are still under the start-up prefix; the new one is the console's.
    async with client.get("/mfa/api/status") as response:
        assert response.status == 401


def test_a_worker_started_later_gets_the_running_config_or_the_last_good_one(
    tmp_path: Path,
) -> None:
    raw = raw_config(tmp_path, "http://127.0.0.1:1")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    started = parse_config(raw, env={})
    configs = RunningConfigs(started, path, file_stamp(path))
    changed = deep_merge(
        raw, {"upstream": {"url": "http://127.0.0.1:2"}, "listen": {"max_body_size": "1KiB"}}
    )
    path.write_text(yaml.safe_dump(changed))
    good, good_stamp = configs.refresh(), file_stamp(path)
    assert good.upstream.url == "http://127.0.0.1:1"  # as the supervisor started
    assert good.listen.max_body_size == 1024  # as the file says now
    assert configs.read_at == good_stamp
    path.write_text(yaml.safe_dump(deep_merge(changed, {"security": {"ip_denylist": ["x"]}})))
    assert configs.refresh() is good  # invalid: what the siblings kept running...
    # ...and the new worker's watcher sees the file as changed since, as theirs did.
    assert configs.read_at == good_stamp != file_stamp(path)
