"""The one outcome every request ends in, used for metrics labels and log lines."""

from enum import StrEnum


class Decision(StrEnum):
    """How the sidecar answered a request (DESIGN: "Each request ends in one decision")."""

    ALLOWED = "allowed"
    GRACE = "grace"
    DENIED_IP = "denied_ip"
    NOT_ALLOWLISTED = "not_allowlisted"
    MFA_SETUP_REQUIRED = "mfa_setup_required"
    MFA_VERIFICATION_REQUIRED = "mfa_verification_required"
    SIDECAR = "sidecar"
    IDENTITY_UNAVAILABLE = "identity_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"
    UPSTREAM_ERROR = "upstream_error"
