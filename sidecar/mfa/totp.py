"""Authenticator-app codes (RFC 6238 TOTP) via pyotp: secrets, provisioning and verification.

Verification returns the matching *time step* rather than a bool: the caller stores the last
accepted step atomically and refuses any step not greater than it, because ``valid_window=1``
alone accepts the same code for about 90 seconds (NOTES "pyotp").
"""

from __future__ import annotations

import hashlib
import re

import pyotp
import segno
from pyotp.utils import strings_equal

DIGITS = 6
INTERVAL = 30
VALID_WINDOW = 1  # accept the previous and next time step: clock drift of up to ~30 s

_NON_DIGITS = re.compile(r"[\s-]")


def new_secret() -> str:
    """A fresh base32 secret of 160 bits (RFC 4226 recommends at least 128)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, *, account: str, issuer: str) -> str:
    return pyotp.TOTP(secret, digits=DIGITS, interval=INTERVAL).provisioning_uri(
        name=account, issuer_name=issuer
    )


def qr_svg(uri: str) -> str:
    """The provisioning URI as an inline SVG QR code (no external assets, no Pillow)."""
    svg: str = segno.make(uri, error="m").svg_inline(scale=4, title="Authenticator app QR code")
    return svg


def normalize_code(code: str) -> str:
    """Codes are typed by people: allow spaces and a hyphen ("123 456", "123-456")."""
    return _NON_DIGITS.sub("", code)


def matching_step(
    secret: str,
    code: str,
    *,
    now: float,
    digits: int = DIGITS,
    interval: int = INTERVAL,
    digest: str = "sha1",
) -> int | None:
    """The time step (T-1, T or T+1) whose code equals ``code``, or None.

    Compares in constant time; a code of the wrong shape never matches.
    """
    code = normalize_code(code)
    if len(code) != digits or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=digits, interval=interval, digest=getattr(hashlib, digest))
    step = totp.timecode(int(now))
    for candidate in range(step - VALID_WINDOW, step + VALID_WINDOW + 1):
        if candidate >= 0 and strings_equal(code, totp.generate_otp(candidate)):
            return candidate
    return None
