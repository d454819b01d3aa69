"""The live security settings (MFA policy, grace period, IP lists), held in the store.

``security.managed_by: store`` (default): the YAML seeds the store once; after that the Security
page edits the store. ``managed_by: config``: the YAML is authoritative; at start (and reload)
it is written to the store when it differs, so every replica and the page show the same.

Every replica polls the settings version (one tiny query every ``POLL_SECONDS``) and swaps its
in-memory copy and IP gate when it moves, so a change made anywhere is enforced everywhere
within seconds while the hot path never queries the store.

Until the settings were loaded once, ``current`` is None and requests that need a decision are
refused (fail closed) rather than judged by possibly stale YAML.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from sidecar.audit import AuditLog
from sidecar.config import Config, IpNetwork
from sidecar.identity.base import role_is_privileged
from sidecar.logs import fields
from sidecar.mfa.policy import MfaPolicy, grace_restarts
from sidecar.store.base import SecuritySettings, Store, StoreUnavailable

log = logging.getLogger("sidecar.settings")

POLL_SECONDS = 2.0


def settings_from_config(config: Config, *, now: datetime) -> SecuritySettings:
    security = config.security
    return SecuritySettings(
        mfa_policy=security.mfa_policy,
        grace_period_seconds=security.grace_period,
        ip_allowlist=tuple(str(n) for n in security.ip_allowlist),
        ip_denylist=tuple(str(n) for n in security.ip_denylist),
        version=0,
        updated_by="config",
        updated_at=now,
    )


def networks(lines: tuple[str, ...]) -> list[IpNetwork]:
    """Stored list entries as networks (they were validated when written)."""
    return [ipaddress.ip_network(line, strict=False) for line in lines]


class ParsedLists:
    """Stored list lines -> networks, reusing earlier parses of identical lists.

    Parsing 100,000 lines takes about a second; the lists usually arrive unchanged (seeded
    from the YAML that was already parsed, or one list edited while the other stayed).
    """

    def __init__(self, config: Config) -> None:
        self._known: dict[tuple[str, ...], list[IpNetwork]] = {}
        for parsed in (config.security.ip_allowlist, config.security.ip_denylist):
            self._known[tuple(str(n) for n in parsed)] = list(parsed)

    def networks(self, lines: tuple[str, ...]) -> list[IpNetwork]:
        found = self._known.get(lines)
        if found is None:
            found = networks(lines)
            # Keep only the latest few parses: old lists must not pile up in memory.
            if len(self._known) >= 4:
                self._known.pop(next(iter(self._known)))
            self._known[lines] = found
        return found


def next_settings(
    current: SecuritySettings | None,
    *,
    mfa_policy: str,
    grace_period_seconds: float,
    ip_allowlist: tuple[str, ...],
    ip_denylist: tuple[str, ...],
    actor: str,
    now: datetime,
) -> SecuritySettings:
    """The settings after a change (a new version; ``updated_by``, ``updated_at``)."""
    return SecuritySettings(
        mfa_policy=mfa_policy,
        grace_period_seconds=grace_period_seconds,
        ip_allowlist=ip_allowlist,
        ip_denylist=ip_denylist,
        version=(current.version if current else 0) + 1,
        updated_by=actor,
        updated_at=now,
    )


def settings_changes(
    old: SecuritySettings | None, new: SecuritySettings
) -> dict[str, dict[str, object]]:
    """What changed, field by field, as audit records show it (``{field: {old, new}}``)."""
    fields_: list[tuple[str, object, object]] = [
        ("mfa_policy", old and old.mfa_policy, new.mfa_policy),
        ("grace_period_seconds", old and old.grace_period_seconds, new.grace_period_seconds),
        ("ip_allowlist", old and list(old.ip_allowlist), list(new.ip_allowlist)),
        ("ip_denylist", old and list(old.ip_denylist), list(new.ip_denylist)),
    ]
    return {name: {"old": a, "new": b} for name, a, b in fields_ if a != b}


def _same_content(a: SecuritySettings, b: SecuritySettings) -> bool:
    return (
        a.mfa_policy == b.mfa_policy
        and a.grace_period_seconds == b.grace_period_seconds
        and a.ip_allowlist == b.ip_allowlist
        and a.ip_denylist == b.ip_denylist
    )


class SettingsService:
    """Loads, seeds, polls and changes the live settings; calls ``on_change`` on each new
    version (to swap the IP gate and update gauges)."""

    def __init__(
        self,
        store: Store,
        config: Config,
        on_change: Callable[[SecuritySettings], None],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        audit: AuditLog | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._yaml_seen: SecuritySettings | None = None
        self._config = config
        self._on_change = on_change
        self._clock = clock
        self.current: SecuritySettings | None = None
        self._task: asyncio.Task[None] | None = None
        self.healthy = False

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config from the next load() on."""
        self._config = config

    @property
    def managed_by(self) -> str:
        return self._config.security.managed_by

    async def grace_restarts(
        self, old: SecuritySettings | None, new: SecuritySettings
    ) -> list[str]:
        """Who a policy change newly requires or releases (their clocks restart with it)."""
        if old is None or old.mfa_policy == new.mfa_policy:
            return []
        roles = self._config.identity.admin_roles
        return grace_restarts(
            MfaPolicy(old.mfa_policy),
            MfaPolicy(new.mfa_policy),
            ((u.user_id, role_is_privileged(u.role, roles)) for u in await self._store.users.all()),
        )

    def _publish(self, settings: SecuritySettings) -> None:
        changed = self.current is None or self.current.version != settings.version
        self.current = settings
        if changed:
            self._on_change(settings)

    async def load(self) -> None:
        """Load (seeding from YAML when needed); raises StoreUnavailable."""
        stored = previous = await self._store.settings.current()
        now = self._clock()
        wanted = settings_from_config(self._config, now=now)
        if stored is None or (
            self._config.security.managed_by == "config" and not _same_content(stored, wanted)
        ):
            new = next_settings(
                stored,
                mfa_policy=wanted.mfa_policy,
                grace_period_seconds=wanted.grace_period_seconds,
                ip_allowlist=wanted.ip_allowlist,
                ip_denylist=wanted.ip_denylist,
                actor="config",
                now=now,
            )
            saved = await self._store.settings.save(
                new,
                expected_version=stored.version if stored else 0,
                restart_grace=await self.grace_restarts(stored, new),
            )
            stored = saved if saved is not None else await self._store.settings.current()
            if saved is not None:
                log.info(
                    "security settings written from config",
                    extra=fields(version=saved.version, managed_by=self.managed_by),
                )
                if self._audit is not None:
                    await self._audit.record(
                        "security.settings.changed",
                        actor="config",
                        client_ip=None,
                        target="security",
                        version=saved.version,
                        changes=settings_changes(previous, saved),
                    )
        elif (
            stored is not None
            and self._config.security.managed_by == "store"
            and previous is not None
            and not _same_content(stored, wanted)
            and self._yaml_seen is not None
            and not _same_content(self._yaml_seen, wanted)
        ):
            log.warning(
                "the YAML's security section changed but security.managed_by is store: the "
                "store keeps the live settings (edit them on the Security page or with "
                "`sidecar security set`)"
            )
        self._yaml_seen = wanted
        if stored is not None:
            self._publish(stored)
        self.healthy = True

    async def refresh(self) -> None:
        version = await self._store.settings.version()
        if self.current is None or version != self.current.version:
            stored = await self._store.settings.current()
            if stored is not None:
                self._publish(stored)

    async def run(self) -> None:
        """Background loop: first load (retrying), then poll for changes."""
        while True:
            try:
                if self.current is None:
                    # Not loaded yet: the store may have been unreachable (or its schema
                    # too new) at start, so migrations are retried here too.
                    await self._store.migrate()
                    await self.load()
                else:
                    await self.refresh()
                if not self.healthy:
                    log.info("store reachable again")
                self.healthy = True
            except StoreUnavailable as exc:
                if self.healthy or self.current is None:
                    log.error("store unavailable: %s", exc)
                self.healthy = False
            await asyncio.sleep(POLL_SECONDS)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def change(
        self,
        *,
        mfa_policy: str,
        grace_period_seconds: float,
        ip_allowlist: tuple[str, ...],
        ip_denylist: tuple[str, ...],
        actor: str,
        expected_version: int,
    ) -> SecuritySettings | None:
        """Write a change if nobody changed the settings since ``expected_version``;
        None when someone did (the caller answers 409)."""
        current = await self._store.settings.current()
        if current is None or current.version != expected_version:
            return None
        new = next_settings(
            current,
            mfa_policy=mfa_policy,
            grace_period_seconds=grace_period_seconds,
            ip_allowlist=ip_allowlist,
            ip_denylist=ip_denylist,
            actor=actor,
            now=self._clock(),
        )
        saved = await self._store.settings.save(
            new,
            expected_version=expected_version,
            restart_grace=await self.grace_restarts(current, new),
        )
        if saved is not None:
            self._publish(saved)
        return saved
