"""Settings that exempt requests from the MFA gate by something a browser session shares.

``token_warnings(config)`` lists them, each naming the YAML path and what follows from it;
``sidecar check-config`` prints them and the sidecar logs them at start. They are warnings,
not errors: each can be what an operator means (a console whose browser sessions never
travel as bearer tokens), but none can be checked by the sidecar.
"""

from __future__ import annotations

from typing import Final

from sidecar.config import Config, Introspect, Jwt

_INSTEAD: Final = {
    "jwt": "recognise API tokens by a claim with identity.jwt.api_token instead",
    "introspect": "recognise API tokens by a field of the console's answer with "
    "identity.introspect.api_token instead",
    "headers": "the headers source cannot recognise API tokens: keep it only if the auth "
    "proxy never accepts a browser's session token as a bearer token",
}

_SKIPS: Final = "skips the MFA gate (a phished password is enough to use the console's API)"


def token_warnings(config: Config) -> list[str]:
    """Warnings about MFA exemptions that cannot be told apart from a browser session:

    * ``mfa.enforce_on_tokens: false``: every bearer-only request skips the gate, a
      browser's own session token sent as ``Authorization: Bearer`` included;
    * an ``api_token`` rule of the active source that every accepted token satisfies
      (``aud`` or ``iss`` equal to the configured ``identity.jwt.audience``/``issuer``), or
      every token of some users (the user's id, email or role claim or field).
    """
    identity = config.identity
    warnings: list[str] = []
    if not config.mfa.enforce_on_tokens:
        warnings.append(
            "mfa.enforce_on_tokens: false: every request authenticated only by "
            "Authorization: Bearer, a browser's own session token sent that way included, "
            f"{_SKIPS}; {_INSTEAD[identity.source]}"
        )
    if identity.source == "jwt":
        warnings.extend(_jwt_rule_warnings(identity.jwt))
    elif identity.source == "introspect":
        warnings.extend(_introspect_rule_warnings(identity.introspect))
    return warnings


def _jwt_rule_warnings(settings: Jwt) -> list[str]:
    rule = settings.api_token
    if rule is None:
        return []
    warnings = []
    checked = {"aud": ("audience", settings.audience), "iss": ("issuer", settings.issuer)}
    if rule.claim in checked and checked[rule.claim][1] == rule.value:
        tokens = (
            "every header token, the browser's session token (identity.jwt.cookie) sent as "
            "Authorization: Bearer included,"
            if settings.cookie
            else "every token, browser sessions included,"
        )
        warnings.append(
            f"identity.jwt.api_token: claim {rule.claim} = {rule.value!r} is "
            f"identity.jwt.{checked[rule.claim][0]}, which every accepted token carries: "
            f"{tokens} {_SKIPS}"
        )
    describing_the_user = {
        settings.id_claim: "id_claim",
        settings.email_claim: "email_claim",
        settings.role_claim: "role_claim",
    }
    if rule.claim in describing_the_user:
        warnings.append(
            _describes_the_user("jwt", "claim", rule.claim, describing_the_user[rule.claim])
        )
    return warnings


def _introspect_rule_warnings(settings: Introspect) -> list[str]:
    rule = settings.api_token
    if rule is None:
        return []
    describing_the_user = {
        settings.id_field: "id_field",
        settings.email_field: "email_field",
        settings.role_field: "role_field",
    }
    if rule.field in describing_the_user:
        return [
            _describes_the_user("introspect", "field", rule.field, describing_the_user[rule.field])
        ]
    return []


def _describes_the_user(source: str, kind: str, name: str, key: str) -> str:
    return (
        f"identity.{source}.api_token: {kind} {name!r} is identity.{source}.{key}, which "
        "describes the user, not the credential: that user's browser session token sent as "
        f"Authorization: Bearer {_SKIPS}"
    )
