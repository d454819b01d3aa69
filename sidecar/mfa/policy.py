"""The organization MFA policy as a pure decision: values in, verdict out (``now`` passed in).

Rules (DESIGN pipeline step 5):

- MFA is *required* under policy ``all``, or under ``admins`` for privileged roles.
- An enrolled user must verify once per sidecar session whatever the policy (an enrolled
  method is a promise to the user that it protects their account).
- A required user who is not enrolled has a grace period: the clock starts the first time the
  requirement is seen for them under the current policy epoch (the caller persists that start
  and passes it in). Re-login, new sessions and role flapping reuse the stored start; a
  tightened policy opens a new epoch and so new clocks; the deadline is always
  start + the *current* grace period, so shortening it applies at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sidecar.decision import Decision


class MfaPolicy(StrEnum):
    OPTIONAL = "optional"
    ADMINS = "admins"
    ALL = "all"


_STRICTNESS = {MfaPolicy.OPTIONAL: 0, MfaPolicy.ADMINS: 1, MfaPolicy.ALL: 2}


def is_tightening(old: MfaPolicy, new: MfaPolicy) -> bool:
    """True when ``new`` requires MFA of users that ``old`` did not (a new grace epoch)."""
    return _STRICTNESS[new] > _STRICTNESS[old]


def is_required(policy: MfaPolicy, privileged: bool) -> bool:
    return policy is MfaPolicy.ALL or (policy is MfaPolicy.ADMINS and privileged)


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
