"""One-time recovery codes (NIST SP 800-63B §5.1.2 "look-up secrets").

Ten codes of ten Crockford base32 characters (50 bits each: enough because verification is
rate-limited by the lockout), shown as ``XXXXX-XXXXX``. Stored only as HMAC-SHA256 under a key
derived from ``storage.encryption_key``, so a database dump alone does not reveal them.
Input is normalised the Crockford way: case, spaces and hyphens ignored; I and L read as 1,
O as 0.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

COUNT = 10
LENGTH = 10
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
_CONFUSABLE = str.maketrans({"I": "1", "L": "1", "O": "0"})


def generate(count: int = COUNT) -> list[str]:
    """``count`` fresh codes, formatted for display (``XXXXX-XXXXX``)."""
    codes = []
    for _ in range(count):
        raw = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
        codes.append(f"{raw[:5]}-{raw[5:]}")
    return codes


def normalize(code: str) -> str | None:
    """The canonical form of a typed code, or None if it cannot be one."""
    cleaned = "".join(code.split()).replace("-", "").upper().translate(_CONFUSABLE)
    if len(cleaned) != LENGTH or any(c not in ALPHABET for c in cleaned):
        return None
    return cleaned


def hashing_key(encryption_key: str) -> bytes:
    """A key for code hashes, separate from the one that encrypts TOTP secrets."""
    return hmac.new(encryption_key.encode(), b"sidecar recovery codes v1", hashlib.sha256).digest()


def code_hash(key: bytes, code: str) -> bytes | None:
    """The stored form of a (typed or displayed) code; None when it is not code-shaped."""
    canonical = normalize(code)
    if canonical is None:
        return None
    return hmac.new(key, canonical.encode(), hashlib.sha256).digest()
