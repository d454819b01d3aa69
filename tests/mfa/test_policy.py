"""The MFA policy verdict (DESIGN pipeline step 5): who passes, who gets grace, who must act.

First one table over every policy, role, enrollment, session and grace state, then the grace
rules as short stories told through :func:`decide` and a fake of the grace store (one clock per
user, removed by the policy changes that newly require or release the user: the contract
``UserStore.grace_started`` and ``SettingsStore.save`` keep). Policy changes go through
:func:`sidecar.settings.next_settings`, so the epochs are the ones the sidecar would really use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from sidecar.decision import Decision
from sidecar.mfa.policy import (
    MfaPolicy,
    MfaVerdict,
    Standing,
    decide,
    grace_restarts,
    is_required,
    needs_grace_start,
    standing,
)
from sidecar.settings import next_settings
from sidecar.store.base import SecuritySettings

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PERIOD = timedelta(hours=72)
HOUR = timedelta(hours=1)

ALLOWED = Decision.ALLOWED
GRACE = Decision.GRACE
SETUP = Decision.MFA_SETUP_REQUIRED
VERIFY = Decision.MFA_VERIFICATION_REQUIRED

SHORT = {ALLOWED: "allowed", GRACE: "grace", SETUP: "setup", VERIFY: "verify"}

# When the user's grace clock started, relative to NOW, or None when no start is looked up.
GRACE_STATES: dict[str, datetime | None] = {
    "no-start": None,
    "in-grace": NOW - HOUR,
    "at-deadline": NOW - PERIOD,
    "grace-expired": NOW - PERIOD - HOUR,
}


@dataclass(frozen=True)
class Case:
    policy: MfaPolicy
    role: str  # "admin" (privileged) or "member"
    enrolled: bool
    verified: bool
    grace: str  # a key of GRACE_STATES
    expected: Decision

    @property
    def id(self) -> str:
        enrolled = "enrolled" if self.enrolled else "not-enrolled"
        verified = "verified" if self.verified else "unverified"
        return (
            f"{self.policy}/{self.role}/{enrolled}/{verified}/{self.grace}"
            f" -> {SHORT[self.expected]}"
        )


def _table() -> list[Case]:
    cases: list[Case] = []
    # Enrolled users verify whatever the policy and role, and grace never enters into it.
    for policy, role in itertools.product(MfaPolicy, ("admin", "member")):
        cases.append(Case(policy, role, True, True, "no-start", ALLOWED))
        cases.append(Case(policy, role, True, False, "no-start", VERIFY))
    # ...even if a stale grace start from before the enrollment is lying around.
    cases.append(Case(MfaPolicy.ALL, "member", True, False, "grace-expired", VERIFY))
    cases.append(Case(MfaPolicy.ADMINS, "admin", True, True, "grace-expired", ALLOWED))
    # Not required, not enrolled: nothing to do.
    for policy, role in [
        (MfaPolicy.OPTIONAL, "admin"),
        (MfaPolicy.OPTIONAL, "member"),
        (MfaPolicy.ADMINS, "member"),
    ]:
        cases.append(Case(policy, role, False, False, "no-start", ALLOWED))
    # Required, not enrolled: grace until the deadline (exclusive), then setup.
    for policy, role in [
        (MfaPolicy.ADMINS, "admin"),
        (MfaPolicy.ALL, "admin"),
        (MfaPolicy.ALL, "member"),
    ]:
        cases.append(Case(policy, role, False, False, "in-grace", GRACE))
        cases.append(Case(policy, role, False, False, "at-deadline", SETUP))
        cases.append(Case(policy, role, False, False, "grace-expired", SETUP))
    # A "verified" flag without an enrolled method buys nothing.
    cases.append(Case(MfaPolicy.ALL, "member", False, True, "grace-expired", SETUP))
    return cases


TABLE = _table()


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_verdict_table(case: Case) -> None:
    started = GRACE_STATES[case.grace]
    verdict = decide(
        policy=case.policy,
        privileged=case.role == "admin",
        enrolled=case.enrolled,
        verified=case.verified,
        grace_started=started,
        grace_period=PERIOD,
        now=NOW,
    )
    assert verdict.decision is case.expected
    if case.expected in (GRACE, SETUP):
        assert started is not None
        # The deadline the interstitial and /mfa/api/status show.
        assert verdict.grace_deadline == started + PERIOD
    else:
        assert verdict.grace_deadline is None


def test_grace_ends_exactly_at_the_deadline() -> None:
    def at(now: datetime) -> MfaVerdict:
        return decide(
            policy=MfaPolicy.ALL,
            privileged=False,
            enrolled=False,
            verified=False,
            grace_started=NOW - PERIOD,
            grace_period=PERIOD,
            now=now,
        )

    before, deadline = at(NOW - timedelta(microseconds=1)), at(NOW)
    assert (before.decision, deadline.decision) == (GRACE, SETUP)
    assert before.grace_deadline == deadline.grace_deadline == NOW


def _role(privileged: bool) -> str:
    return "admin" if privileged else "member"


REQUIRED = [
    (MfaPolicy.OPTIONAL, False, False),
    (MfaPolicy.OPTIONAL, True, False),
    (MfaPolicy.ADMINS, False, False),
    (MfaPolicy.ADMINS, True, True),
    (MfaPolicy.ALL, False, True),
    (MfaPolicy.ALL, True, True),
]


@pytest.mark.parametrize(
    ("policy", "privileged", "required"),
    [
        pytest.param(*row, id=f"{row[0]}/{_role(row[1])} -> {'required' if row[2] else 'optional'}")
        for row in REQUIRED
    ],
)
def test_is_required(policy: MfaPolicy, privileged: bool, required: bool) -> None:
    assert is_required(policy, privileged) is required


# (old, new) -> whose clocks restart: admins, members (a change that starts or lifts it).
RESTARTS = [
    (MfaPolicy.OPTIONAL, MfaPolicy.OPTIONAL, set()),
    (MfaPolicy.OPTIONAL, MfaPolicy.ADMINS, {"admin"}),
    (MfaPolicy.OPTIONAL, MfaPolicy.ALL, {"admin", "member"}),
    (MfaPolicy.ADMINS, MfaPolicy.OPTIONAL, {"admin"}),
    (MfaPolicy.ADMINS, MfaPolicy.ADMINS, set()),
    (MfaPolicy.ADMINS, MfaPolicy.ALL, {"member"}),
    (MfaPolicy.ALL, MfaPolicy.OPTIONAL, {"admin", "member"}),
    (MfaPolicy.ALL, MfaPolicy.ADMINS, {"member"}),
    (MfaPolicy.ALL, MfaPolicy.ALL, set()),
]


@pytest.mark.parametrize(
    ("old", "new", "restarted"),
    [
        pytest.param(*row, id=f"{row[0]} -> {row[1]}: {sorted(row[2]) or 'nobody'}")
        for row in RESTARTS
    ],
)
def test_a_policy_change_restarts_the_clocks_of_those_it_requires_or_releases(
    old: MfaPolicy, new: MfaPolicy, restarted: set[str]
) -> None:
    users = [("admin", True), ("member", False)]
    assert set(grace_restarts(old, new, users)) == restarted
    assert grace_restarts(None, new, users) == []  # the first settings: nothing to restart


@pytest.mark.parametrize(
    ("policy", "privileged", "enrolled", "started", "expected"),
    [
        (MfaPolicy.ALL, False, True, None, Standing.ENROLLED),
        (MfaPolicy.ADMINS, False, False, None, Standing.NOT_REQUIRED),
        (MfaPolicy.ADMINS, True, False, NOW - HOUR, Standing.GRACE),
        (MfaPolicy.ADMINS, True, False, NOW - PERIOD, Standing.OVERDUE),
        (MfaPolicy.ALL, False, False, None, Standing.GRACE),  # a clock would start now
    ],
)
def test_standing_matches_the_verdict(
    policy: MfaPolicy,
    privileged: bool,
    enrolled: bool,
    started: datetime | None,
    expected: Standing,
) -> None:
    assert (
        standing(
            policy=policy,
            privileged=privileged,
            enrolled=enrolled,
            grace_started=started,
            grace_period=PERIOD,
            now=NOW,
        )
        is expected
    )
    # The gate's verdict for the same user says the same (an unverified enrolled user aside).
    verdict = decide(
        policy=policy,
        privileged=privileged,
        enrolled=enrolled,
        verified=True,
        grace_started=started or NOW,
        grace_period=PERIOD,
        now=NOW,
    ).decision
    assert {
        Standing.ENROLLED: ALLOWED,
        Standing.NOT_REQUIRED: ALLOWED,
        Standing.GRACE: GRACE,
        Standing.OVERDUE: SETUP,
    }[expected] is verdict


@pytest.mark.parametrize(
    ("policy", "privileged", "enrolled"),
    [
        pytest.param(
            policy,
            privileged,
            enrolled,
            id=f"{policy}/{_role(privileged)}/{'enrolled' if enrolled else 'not-enrolled'}",
        )
        for policy, privileged, enrolled in itertools.product(
            MfaPolicy, (True, False), (True, False)
        )
    ],
)
def test_needs_grace_start_is_exactly_when_decide_needs_it(
    policy: MfaPolicy, privileged: bool, enrolled: bool
) -> None:
    """The gate looks the start up (and so starts the clock) only when decide() needs it:
    never for users the policy does not require, never for enrolled users."""
    needed = needs_grace_start(policy=policy, privileged=privileged, enrolled=enrolled)
    assert needed is (not enrolled and is_required(policy, privileged))
    for verified in (True, False):

        def judge(verified: bool = verified) -> MfaVerdict:
            return decide(
                policy=policy,
                privileged=privileged,
                enrolled=enrolled,
                verified=verified,
                grace_started=None,
                grace_period=PERIOD,
                now=NOW,
            )

        if needed:
            # Fail closed: a caller that forgot the lookup gets an error, never a pass.
            with pytest.raises(ValueError, match="grace_started"):
                judge()
        else:
            assert judge().decision in (ALLOWED, VERIFY)


# --- grace rules as scenarios ----------------------------------------------------------------


@dataclass
class FakeGraceStore:
    """The store's grace contract: one clock per user, started the first time it is asked
    for; a policy change removes the clocks of the users it newly requires or releases."""

    starts: dict[str, datetime] = field(default_factory=dict)

    def start_for(self, user: str, now: datetime) -> datetime:
        return self.starts.setdefault(user, now)


@dataclass
class Org:
    """The live settings and the grace store, judged as the MFA gate does for each request;
    users' roles as last seen (what a policy change judges them by)."""

    settings: SecuritySettings
    store: FakeGraceStore = field(default_factory=FakeGraceStore)
    roles: dict[str, str] = field(default_factory=dict)

    @classmethod
    def with_policy(cls, policy: str, *, grace: timedelta = PERIOD) -> Org:
        return cls(_settings(None, policy, grace))

    def change(self, *, policy: str | None = None, grace: timedelta | None = None) -> None:
        current = self.settings
        self.settings = _settings(
            current,
            policy or current.mfa_policy,
            grace if grace is not None else timedelta(seconds=current.grace_period_seconds),
        )
        users = [(user, role == "admin") for user, role in self.roles.items()]
        restarts = grace_restarts(
            MfaPolicy(current.mfa_policy), MfaPolicy(self.settings.mfa_policy), users
        )
        for user in restarts:
            self.store.starts.pop(user, None)

    def request(
        self,
        user: str,
        *,
        role: str,
        at: datetime,
        enrolled: bool = False,
        verified: bool = False,
    ) -> MfaVerdict:
        self.roles[user] = role
        policy = MfaPolicy(self.settings.mfa_policy)
        privileged = role == "admin"
        started = None
        if needs_grace_start(policy=policy, privileged=privileged, enrolled=enrolled):
            started = self.store.start_for(user, at)
        return decide(
            policy=policy,
            privileged=privileged,
            enrolled=enrolled,
            verified=verified,
            grace_started=started,
            grace_period=timedelta(seconds=self.settings.grace_period_seconds),
            now=at,
        )


def _settings(current: SecuritySettings | None, policy: str, grace: timedelta) -> SecuritySettings:
    return next_settings(
        current,
        mfa_policy=policy,
        grace_period_seconds=grace.total_seconds(),
        ip_allowlist=(),
        ip_denylist=(),
        actor="u-owner",
        now=NOW,
    )


T0 = NOW


def test_role_flapping_keeps_the_first_start() -> None:
    org = Org.with_policy("admins")
    first = org.request("u-bob", role="admin", at=T0)
    assert first == MfaVerdict(GRACE, T0 + PERIOD)
    # Demoted for a while: not required, so nothing is asked and nothing is recorded anew.
    assert org.request("u-bob", role="member", at=T0 + 10 * HOUR).decision is ALLOWED
    # Promoted again two days later: the clock was not restarted, the deadline did not move.
    again = org.request("u-bob", role="admin", at=T0 + 48 * HOUR)
    assert again == MfaVerdict(GRACE, T0 + PERIOD)
    assert org.request("u-bob", role="admin", at=T0 + PERIOD).decision is SETUP


def test_relogin_and_new_sessions_keep_the_same_deadline() -> None:
    org = Org.with_policy("all")
    assert org.request("u-carol", role="member", at=T0).grace_deadline == T0 + PERIOD
    # Every later request (a new browser, a fresh console login) sees the same deadline.
    for later in (T0 + HOUR, T0 + 24 * HOUR, T0 + PERIOD - HOUR):
        assert org.request("u-carol", role="member", at=later) == MfaVerdict(GRACE, T0 + PERIOD)
    assert org.request("u-carol", role="member", at=T0 + PERIOD + HOUR).decision is SETUP


def test_each_user_has_their_own_clock() -> None:
    org = Org.with_policy("all")
    org.request("u-carol", role="member", at=T0)
    later = org.request("u-dave", role="member", at=T0 + 30 * HOUR)
    assert later.grace_deadline == T0 + 30 * HOUR + PERIOD
    assert org.request("u-carol", role="member", at=T0 + PERIOD).decision is SETUP


def test_shortening_the_grace_period_applies_at_once() -> None:
    org = Org.with_policy("all")
    assert org.request("u-carol", role="member", at=T0).decision is GRACE
    org.change(grace=timedelta(hours=24))  # no requirement changed: same clocks
    verdict = org.request("u-carol", role="member", at=T0 + 30 * HOUR)
    assert verdict == MfaVerdict(SETUP, T0 + 24 * HOUR)


def test_lengthening_the_grace_period_applies_at_once() -> None:
    org = Org.with_policy("all", grace=timedelta(hours=24))
    org.request("u-carol", role="member", at=T0)
    assert org.request("u-carol", role="member", at=T0 + 30 * HOUR).decision is SETUP
    org.change(grace=timedelta(hours=96))
    verdict = org.request("u-carol", role="member", at=T0 + 30 * HOUR)
    assert verdict == MfaVerdict(GRACE, T0 + 96 * HOUR)


def test_editing_other_settings_does_not_restart_clocks() -> None:
    org = Org.with_policy("all")
    org.request("u-carol", role="member", at=T0)
    org.settings = next_settings(
        org.settings,
        mfa_policy="all",
        grace_period_seconds=PERIOD.total_seconds(),
        ip_allowlist=("10.0.0.0/8",),
        ip_denylist=(),
        actor="u-owner",
        now=T0 + HOUR,
    )
    verdict = org.request("u-carol", role="member", at=T0 + PERIOD + HOUR)
    assert verdict == MfaVerdict(SETUP, T0 + PERIOD)


def test_a_policy_change_starts_clocks_only_for_users_it_newly_requires() -> None:
    org = Org.with_policy("optional")
    # Optional: nobody is required, and no clock starts for anybody.
    assert org.request("u-bob", role="admin", at=T0).decision is ALLOWED
    assert org.store.starts == {}

    t1 = T0 + 100 * HOUR
    org.change(policy="admins")
    assert org.request("u-bob", role="admin", at=t1) == MfaVerdict(GRACE, t1 + PERIOD)
    assert org.request("u-carol", role="member", at=t1).decision is ALLOWED

    # Bob's grace under `admins` runs out. `all` newly requires members, with new clocks;
    # Bob was required before and after: his deadline stays where it was.
    t2 = t1 + PERIOD + HOUR
    assert org.request("u-bob", role="admin", at=t2).decision is SETUP
    org.change(policy="all")
    assert org.request("u-carol", role="member", at=t2) == MfaVerdict(GRACE, t2 + PERIOD)
    assert org.request("u-bob", role="admin", at=t2) == MfaVerdict(SETUP, t1 + PERIOD)


def test_policy_edits_that_keep_a_user_required_never_renew_grace() -> None:
    org = Org.with_policy("admins")
    assert org.request("u-bob", role="admin", at=T0) == MfaVerdict(GRACE, T0 + PERIOD)
    # admins -> all -> admins, over and over: bob stays required, his deadline never moves.
    for i, policy in enumerate(["all", "admins", "all", "admins"], start=1):
        org.change(policy=policy)
        at = T0 + i * 10 * HOUR
        assert org.request("u-bob", role="admin", at=at) == MfaVerdict(GRACE, T0 + PERIOD)
    assert org.request("u-bob", role="admin", at=T0 + PERIOD).decision is SETUP


def test_a_requirement_lifted_and_reimposed_starts_a_new_clock() -> None:
    org = Org.with_policy("all")
    assert org.request("u-carol", role="member", at=T0) == MfaVerdict(GRACE, T0 + PERIOD)
    org.change(policy="admins")  # lifted for members
    assert org.request("u-carol", role="member", at=T0 + HOUR).decision is ALLOWED
    t1 = T0 + 10 * PERIOD
    org.change(policy="all")  # re-imposed: a new clock, from when it is first seen again
    assert org.request("u-carol", role="member", at=t1) == MfaVerdict(GRACE, t1 + PERIOD)

    # The same for an admin through `optional`.
    org = Org.with_policy("admins")
    org.request("u-bob", role="admin", at=T0)
    org.change(policy="optional")
    org.change(policy="admins")
    assert org.request("u-bob", role="admin", at=t1) == MfaVerdict(GRACE, t1 + PERIOD)


def test_a_demoted_admin_newly_required_as_a_member_gets_a_new_clock() -> None:
    org = Org.with_policy("admins")
    org.request("u-bob", role="admin", at=T0)
    # Demoted (and seen so: not required), then the policy newly requires members: the
    # change required him anew.
    assert org.request("u-bob", role="member", at=T0 + HOUR).decision is ALLOWED
    org.change(policy="all")
    t1 = T0 + 10 * PERIOD
    assert org.request("u-bob", role="member", at=t1) == MfaVerdict(GRACE, t1 + PERIOD)


def test_an_overdue_admin_demoted_after_all_is_rolled_out_stays_overdue() -> None:
    org = Org.with_policy("admins")
    org.request("u-alice", role="admin", at=T0)
    late = T0 + PERIOD + HOUR
    assert org.request("u-alice", role="admin", at=late).decision is SETUP
    org.change(policy="all")  # alice, an admin, was required before and after
    assert org.request("u-alice", role="admin", at=late).decision is SETUP
    # Her role flaps: she was required all along; her deadline does not move.
    assert org.request("u-alice", role="member", at=late) == MfaVerdict(SETUP, T0 + PERIOD)
    assert org.request("u-alice", role="admin", at=late) == MfaVerdict(SETUP, T0 + PERIOD)


def test_loosening_does_not_start_new_clocks() -> None:
    org = Org.with_policy("all")
    org.request("u-bob", role="admin", at=T0)
    org.request("u-carol", role="member", at=T0)

    org.change(policy="admins")
    t1 = T0 + 10 * HOUR
    assert org.request("u-carol", role="member", at=t1).decision is ALLOWED
    # Bob was required all along: loosening for members gives him no fresh grace.
    assert org.request("u-bob", role="admin", at=t1) == MfaVerdict(GRACE, T0 + PERIOD)
    assert org.request("u-bob", role="admin", at=T0 + PERIOD).decision is SETUP

    org.change(policy="optional")
    assert org.request("u-bob", role="admin", at=T0 + PERIOD).decision is ALLOWED


@pytest.mark.parametrize("policy", ["optional", "admins", "all"])
@pytest.mark.parametrize("role", ["admin", "member"])
def test_enrolled_users_must_verify_whatever_the_policy(policy: str, role: str) -> None:
    org = Org.with_policy(policy)
    late = T0 + 10 * PERIOD
    assert org.request("u-erin", role=role, at=late, enrolled=True).decision is VERIFY
    assert org.request("u-erin", role=role, at=late, enrolled=True, verified=True) == MfaVerdict(
        ALLOWED
    )
    # Enrolled users never start a grace clock.
    assert org.store.starts == {}


def test_enrolling_during_grace_then_loosening_still_requires_verification() -> None:
    org = Org.with_policy("all")
    assert org.request("u-carol", role="member", at=T0).decision is GRACE
    # Carol enrolls; later the policy is loosened to optional: her method still protects her.
    org.change(policy="optional")
    assert org.request("u-carol", role="member", at=T0 + HOUR, enrolled=True).decision is VERIFY
