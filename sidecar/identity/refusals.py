"""Why the jwt source refused a token, what each reason makes of the request, and the
counter of them (``sidecar_identity_token_refusals_total{reason}``).

The line between the two outcomes is whether the console might accept the token:

* The sidecar verified the signature with its key, so the token is one the console's
  issuer made, but the sidecar's own checks refuse it (``exp`` missing, ``aud`` or ``iss``
  not the configured ones, an ``nbf`` or ``iat`` still ahead, claims that do not parse, no
  usable user id), or it is signed with an algorithm the sidecar does not accept, so the
  signature could not be checked at all: the console may well accept it. Calling it
  anonymous would let the request skip the MFA gate, so it **fails closed**
  (:class:`~sidecar.identity.base.IdentityUnavailable`, 503). A token with an ``nbf`` in the
  future is among these: it is valid moments later, and a console whose clock runs ahead of
  the sidecar's (or that ignores ``nbf``) accepts it now.
* Expired (past the 30 s leeway): the console refuses it too, and every browser whose
  session lapsed sends one, so the request is **anonymous** and the console answers it
  (typically with its login page).
* A signature that does not verify with the sidecar's key, or a string that is not a JWT at
  all: nothing shows it is the issuer's, so it is **anonymous** too. This assumes the
  sidecar's key verifies every token the console accepts: while the console trusts another
  key (an issuer's key rotation not yet configured here), its tokens pass as anonymous.
  ``bad_signature`` in the counter is the sign of that.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from prometheus_client import CollectorRegistry, Counter


class TokenRefusal(StrEnum):
    """A reason the jwt source refused a token; its value is the metric label."""

    EXPIRED = "expired"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    NOT_YET_VALID = "not_yet_valid"
    MISSING_CLAIM = "missing_claim"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_ISSUER = "wrong_issuer"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    INVALID_CLAIMS = "invalid_claims"
    NO_USER_ID = "no_user_id"

    @property
    def fails_closed(self) -> bool:
        """Whether the request is refused with 503 rather than treated as anonymous."""
        return self not in _ANONYMOUS


_ANONYMOUS: Final = frozenset(
    {TokenRefusal.EXPIRED, TokenRefusal.BAD_SIGNATURE, TokenRefusal.MALFORMED}
)


class TokenRefusals:
    """``sidecar_identity_token_refusals_total{reason}``, every reason created at 0.

    Made once per app (a reload's new provider gets the same one: a registry takes a metric
    name once).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        counter = Counter(
            "sidecar_identity_token_refusals_total",
            "JWTs the jwt identity source refused, by reason; expired, bad_signature and "
            "malformed count the request as anonymous, every other reason answers it 503",
            ["reason"],
            registry=registry,
        )
        self._by_reason = {reason: counter.labels(reason.value) for reason in TokenRefusal}

    def count(self, reason: TokenRefusal) -> None:
        self._by_reason[reason].inc()
