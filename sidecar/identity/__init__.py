"""Who is calling (DESIGN pipeline step 4): one small module per identity source.

``build_identity_provider(config)`` picks the source; every source answers through the
:class:`IdentityProvider` protocol with an :class:`Identity`, ``None`` (anonymous) or
:class:`IdentityUnavailable` (fail closed).
"""

from sidecar.identity.base import (
    ANONYMOUS,
    Identity,
    IdentityProvider,
    IdentityUnavailable,
    build_identity_provider,
    is_privileged,
)
from sidecar.identity.headers import identity_header_names, strip_identity_headers

__all__ = [
    "ANONYMOUS",
    "Identity",
    "IdentityProvider",
    "IdentityUnavailable",
    "build_identity_provider",
    "identity_header_names",
    "is_privileged",
    "strip_identity_headers",
]
