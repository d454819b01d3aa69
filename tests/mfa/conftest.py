"""Fixtures for the MFA tests: ``console`` (a stub console) and ``sidecar`` (a factory)."""

from tests.mfa.support import console, sidecar

__all__ = ["console", "sidecar"]
