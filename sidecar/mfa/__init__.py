"""MFA: the policy (pure), the methods (TOTP, passkeys, recovery codes), sessions and pages."""
