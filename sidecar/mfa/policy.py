"""The organization MFA policy as a pure decision: values in, verdict out (``now`` passed in).

Rules (DESIGN pipeline step 5):

- MFA is *required* under policy ``all``, or under ``admins`` for privileged roles.
- An enrolled user must verify once per sidecar session whatever the policy (an enrolled
  method is a promise to the user that it protects their account).
- A required user who is not enrolled has a grace period: the clock starts the first time the
  requirement is seen for them (the caller persists that start and passes it in). Re-login,
  new sessions, role flapping and policy edits that leave them required reuse the stored
  start. A policy change removes the clocks of the users it newly requires or releases
  (:func:`grace_restarts`, judged by each user's last-seen role, in the same transaction as
  the change): a newly required user starts a clock when next seen, and so does a user whose
  requirement was lifted and later re-imposed. The deadline is always start + the *current*
  grace period, so shortening it applies at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sidecar.decision import Decision


class MfaPolicy(StrEnum):
    OPTIONAL = "optional"
    ADMINS = "admins"
    ALL = "all"


def is_required(policy: MfaPolicy, privileged: bool) -> bool:
    return policy is MfaPolicy.ALL or (policy is MfaPolicy.ADMINS and privileged)


def grace_restarts(
    old: MfaPolicy | None, new: MfaPolicy, users: Iterable[tuple[str, bool]]
) -> list[str]:
    """The users (``(id, privileged)``) whose grace clock a policy change from ``old`` to
    ``new`` restarts: those it newly requires or releases, judged by the role they were last
    seen with. Everyone required before and after keeps their clock (``admins`` -> ``all``
    -> ``admins`` never renews an admin's grace); a role change never restarts a clock."""
    if old is None or old is new:
        return []
    return [
        user
        for user, privileged in users
        if is_required(old, privileged) != is_required(new, privileged)
    ]


@dataclass(frozen=True, slots=True)
class MfaVerdict:
    decision: Decision  # ALLOWED, GRACE, MFA_SETUP_REQUIRED or MFA_VERIFICATION_REQUIRED
    grace_deadline: datetime | None = None


ALLOWED = MfaVerdict(Decision.ALLOWED)
VERIFY = MfaVerdict(Decision.MFA_VERIFICATION_REQUIRED)


def decide(
    *,
    policy: MfaPolicy,
    privileged: bool,
    enrolled: bool,
    verified: bool,
    grace_started: datetime | None,
    grace_period: timedelta,
    now: datetime,
) -> MfaVerdict:
    """The verdict for one authenticated request.

    ``grace_started`` must be given (the stored start for the current epoch) whenever the
    user is required and not enrolled; :func:`needs_grace_start` tells the caller when.
    """
    if enrolled:
        return ALLOWED if verified else VERIFY
    if not is_required(policy, privileged):
        return ALLOWED
    if grace_started is None:
        raise ValueError("grace_started is needed for a required, unenrolled user")
    deadline = grace_started + grace_period
    if now < deadline:
        return MfaVerdict(Decision.GRACE, deadline)
    return MfaVerdict(Decision.MFA_SETUP_REQUIRED, deadline)


def needs_grace_start(*, policy: MfaPolicy, privileged: bool, enrolled: bool) -> bool:
    """Whether :func:`decide` needs the user's grace start (so the caller looks it up)."""
    return not enrolled and is_required(policy, privileged)


class Standing(StrEnum):
    """Where a known user stands with the policy, for gauges and the Security page preview."""

    ENROLLED = "enrolled"
    GRACE = "grace"
    OVERDUE = "overdue"
    NOT_REQUIRED = "not_required"


def standing(
    *,
    policy: MfaPolicy,
    privileged: bool,
    enrolled: bool,
    grace_started: datetime | None,
    grace_period: timedelta,
    now: datetime,
) -> Standing:
    """The one classification both the gauges and the preview use. ``grace_started`` None
    for a required user means a clock would start at ``now``."""
    if enrolled:
        return Standing.ENROLLED
    if not is_required(policy, privileged):
        return Standing.NOT_REQUIRED
    start = grace_started if grace_started is not None else now
    return Standing.GRACE if now < start + grace_period else Standing.OVERDUE
