"""Command line: argument parsing and wiring only.

Exit status: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from sidecar import __version__
from sidecar.config import Config, ConfigError, load_config
from sidecar.config_checks import config_warnings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _load(path: str) -> Config | None:
    try:
        config = load_config(path)
        if config.identity.source == "jwt":
            # The key file and the algorithms are checked together when the provider is
            # built: a key `run` would refuse must fail check-config too, with the same words.
            from sidecar.identity.jwt import load_verification_key

            load_verification_key(config.identity.jwt)
        return config
    except ConfigError as exc:
        print(f"{path}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    from sidecar.process_signals import StartupSignals

    # First: a SIGHUP (or SIGTERM) from here on is remembered, not the end of the process.
    early = StartupSignals.install()
    from sidecar.file_stamp import file_stamp
    from sidecar.logs import configure_logging, log_config_warnings  # deferred: fast `--help`
    from sidecar.sd_notify import Notifier

    path = Path(args.config).resolve()
    read_at = file_stamp(path)  # before reading: a change made meanwhile is reloaded
    config = _load(args.config)
    if config is None:
        early.restore()
        return EXIT_CONFIG
    configure_logging(config.logging.level, config.logging.format)
    log_config_warnings(config_warnings(config), trigger="start")
    notifier = Notifier.from_environment(os.environ)
    if config.workers > 1:
        from sidecar.workers import prepare_metrics_dir, run_workers

        # Before anything imports prometheus-client: it picks multiprocess mode at import.
        metrics_dir = prepare_metrics_dir()
        return run_workers(
            config, path, metrics_dir, read_at=read_at, early=early, notifier=notifier
        )
    from sidecar.server import run_until_stopped, serve

    try:
        run_until_stopped(serve(config, path, read_at=read_at, early=early, notifier=notifier))
    except OSError as exc:
        logging.getLogger("sidecar").error("cannot start: %s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return EXIT_CONFIG
    # Accepted, but weaker than it looks: on stderr, so that stdout stays the one-line verdict.
    for line in config_warnings(config):
        print(f"warning: {line}", file=sys.stderr)
    print(
        f"{args.file}: ok (upstream {config.upstream.url}, "
        f"{len(config.security.ip_allowlist)} allowlist and "
        f"{len(config.security.ip_denylist)} denylist rules, "
        f"MFA policy {config.security.mfa_policy})"
    )
    return EXIT_OK


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    print(Fernet.generate_key().decode())
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_demo(
        host=args.host, port=args.port, data_dir=args.data_dir, admin_port=args.admin_port
    )


def _run_store_command(config: Config, main: Coroutine[Any, Any, tuple[bool, str]]) -> int:
    from sidecar.store.base import StoreUnavailable

    try:
        ok, message = asyncio.run(main)
    except StoreUnavailable as exc:
        print(f"store unavailable ({config.storage.url.split('@')[-1]}): {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(message, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


async def _ok(message: Coroutine[Any, Any, str]) -> tuple[bool, str]:
    return True, await message


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from sidecar.operations import audit_verify

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return _run_store_command(config, audit_verify(config))


def _cmd_users_reset_mfa(args: argparse.Namespace) -> int:
    from sidecar.identity.base import valid_user_id
    from sidecar.operations import reset_mfa

    if not valid_user_id(args.id):
        print(f"sidecar users reset-mfa: {args.id!r} is not a user id", file=sys.stderr)
        return EXIT_CONFIG
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return _run_store_command(config, _ok(reset_mfa(config, args.id)))


def _cmd_security_show(args: argparse.Namespace) -> int:
    from sidecar.operations import security_show

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return _run_store_command(config, _ok(security_show(config)))


def _cmd_security_set(args: argparse.Namespace) -> int:
    from sidecar.operations import security_set

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.clear_allowlist and args.allow:
        print("--clear-allowlist and --allow exclude each other", file=sys.stderr)
        return EXIT_CONFIG
    if args.clear_denylist and args.deny:
        print("--clear-denylist and --deny exclude each other", file=sys.stderr)
        return EXIT_CONFIG
    allow = [] if args.clear_allowlist else args.allow
    deny = [] if args.clear_denylist else args.deny
    if args.mfa_policy is None and args.grace_period is None and allow is None and deny is None:
        print("nothing to change: give at least one option (see --help)", file=sys.stderr)
        return EXIT_CONFIG
    return _run_store_command(
        config,
        security_set(
            config,
            mfa_policy=args.mfa_policy,
            grace_period=args.grace_period,
            allowlist=allow,
            denylist=deny,
        ),
    )


def _cmd_store_check(args: argparse.Namespace) -> int:
    from sidecar.operations import store_check

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return _run_store_command(config, _ok(store_check(config)))


def _cmd_store_backup(args: argparse.Namespace) -> int:
    from sidecar.operations import store_backup

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return _run_store_command(config, store_backup(config, Path(args.file)))


def _cmd_store_restore(args: argparse.Namespace) -> int:
    from sidecar.operations import store_restore

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    return _run_store_command(config, store_restore(config, Path(args.file) if args.file else None))


def _cmd_ip_explain(args: argparse.Namespace) -> int:
    from sidecar.explain import explain_ip

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from sidecar.operations import live_ip_lists

    lists = asyncio.run(live_ip_lists(config))
    try:
        report, ok = explain_ip(
            config, args.addr, via=args.via, header_lines=args.header or [], lists=lists
        )
    except ValueError as exc:
        print(f"sidecar ip explain: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(report)
    return EXIT_OK if ok else EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Ingress enforcement sidecar: IP restrictions and MFA in front of a console.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the sidecar")
    run.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML config file")
    run.set_defaults(func=_cmd_run)

    check = commands.add_parser("check-config", help="validate a config file (exit 0 or 2)")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=_cmd_check_config)

    keys = commands.add_parser("keys", help="key utilities")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = keys_commands.add_parser(
        "generate", help="print a new Fernet key (for mfa.session.secret_keys or the data key)"
    )
    generate.set_defaults(func=_cmd_keys_generate)

    demo = commands.add_parser("demo", help="run a demo console with the sidecar in front")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on")
    demo.add_argument("--port", type=int, default=8080, help="sidecar port (default 8080)")
    demo.add_argument(
        "--admin-port", type=int, default=9090, help="metrics and health port (default 9090)"
    )
    demo.add_argument(
        "--data-dir", default="demo-data", help="folder for the demo's SQLite state and keys"
    )
    demo.set_defaults(func=_cmd_demo)

    ip = commands.add_parser("ip", help="IP restriction tools")
    ip_commands = ip.add_subparsers(dest="ip_command", required=True, metavar="ACTION")
    explain = ip_commands.add_parser(
        "explain", help="show how an address is resolved and which rule decides it"
    )
    explain.add_argument("addr", metavar="ADDR", help="the address to test (or the header's)")
    explain.add_argument("--config", "-c", required=True, metavar="FILE")
    explain.add_argument(
        "--via", metavar="PEER", help="the TCP peer the request arrives from (e.g. your LB)"
    )
    explain.add_argument(
        "--header",
        action="append",
        metavar="'NAME: VALUE'",
        help="a forwarded header line as the peer sends it; repeat for several lines",
    )
    explain.set_defaults(func=_cmd_ip_explain)

    audit = commands.add_parser("audit", help="audit trail tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit_commands.add_parser(
        "verify", help="check the audit hash chain; names the first broken record"
    )
    verify.add_argument("--config", "-c", required=True, metavar="FILE")
    verify.set_defaults(func=_cmd_audit_verify)

    users = commands.add_parser("users", help="user tools (break-glass)")
    users_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    reset = users_commands.add_parser(
        "reset-mfa", help="remove every MFA method of a user (lost device); audited as cli"
    )
    reset.add_argument("id", metavar="ID", help="the user id as the console reports it")
    reset.add_argument("--config", "-c", required=True, metavar="FILE")
    reset.set_defaults(func=_cmd_users_reset_mfa)

    store = commands.add_parser("store", help="the state store")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    check_store = store_commands.add_parser(
        "check", help="migrate if needed and report what upgrades changed (re-keyed user ids)"
    )
    check_store.add_argument("--config", "-c", required=True, metavar="FILE")
    check_store.set_defaults(func=_cmd_store_check)
    backup = store_commands.add_parser(
        "backup", help="online backup of the SQLite store into FILE (PostgreSQL: pg_dump)"
    )
    backup.add_argument("file", metavar="FILE")
    backup.add_argument("--config", "-c", required=True, metavar="FILE")
    backup.set_defaults(func=_cmd_store_backup)
    restore = store_commands.add_parser(
        "restore",
        help="with the sidecar stopped: put a SQLite backup in place (PostgreSQL: after "
        "pg_restore, without FILE) and record the restore point in the audit trail",
    )
    restore.add_argument("file", metavar="FILE", nargs="?")
    restore.add_argument("--config", "-c", required=True, metavar="FILE")
    restore.set_defaults(func=_cmd_store_restore)

    security = commands.add_parser("security", help="live security settings (break-glass)")
    security_commands = security.add_subparsers(
        dest="security_command", required=True, metavar="ACTION"
    )
    show = security_commands.add_parser("show", help="print the live settings as JSON")
    show.add_argument("--config", "-c", required=True, metavar="FILE")
    show.set_defaults(func=_cmd_security_show)
    change = security_commands.add_parser(
        "set", help="change the live settings, e.g. --clear-allowlist after a lock-out"
    )
    change.add_argument("--config", "-c", required=True, metavar="FILE")
    change.add_argument("--mfa-policy", choices=["optional", "admins", "all"])
    change.add_argument("--grace-period", metavar="DURATION", help="e.g. 72h, 7d")
    change.add_argument("--allow", action="append", metavar="CIDR", help="replace the allowlist")
    change.add_argument("--deny", action="append", metavar="CIDR", help="replace the denylist")
    change.add_argument("--clear-allowlist", action="store_true", help="empty the allowlist")
    change.add_argument("--clear-denylist", action="store_true", help="empty the denylist")
    change.set_defaults(func=_cmd_security_set)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_OK
