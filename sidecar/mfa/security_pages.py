"""The Security and Audit pages: pure render functions (values in, HTML string out; no I/O).

``/mfa/security`` shows everyone their own sign-in methods (passkeys, authenticator app,
recovery codes); admins also get the organization's MFA policy, the IP allow/deny lists and a
link to ``/mfa/audit``, the audit log table. ``static/security.js`` does the talking to the
JSON API; it gets the prefix, the CSRF token and the settings version from ``data-``
attributes on ``<main>``.

Security assumptions (the same as :mod:`sidecar.mfa.pages`):

- Every dynamic value is written through :func:`html.escape` (quotes included), in text and
  in attributes alike; the audit table is filled by security.js with ``textContent`` only.
- No inline ``<script>``, no ``<style>`` element, no ``style=`` or ``on*=`` attribute, only
  same-origin assets: the pages work under
  ``Content-Security-Policy: default-src 'self'; img-src 'self' data:; style-src 'self'``.
- The settings forms post (``method="post"``) and are rendered inside ``<fieldset disabled
  data-needs-script>``, enabled by security.js, which sends them as JSON: without script they
  cannot be submitted, so the IP lists and the policy never land in a URL. The audit filter
  form is the one GET form: it carries no secret and no change, only a search that is meant
  to be bookmarkable (security.js writes it into the address bar itself).
- What a member may see is decided here from ``privileged`` and ``settings``; the JSON API
  enforces the same rules again for every call (this is presentation, not access control).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from sidecar.mfa.pages import PageContext, format_utc, local_path

#: The org MFA policies in the order the page offers them: (value, label, meaning).
POLICY_CHOICES: tuple[tuple[str, str, str], ...] = (
    (
        "optional",
        "Optional: members choose",
        "Nobody has to use MFA; anyone can set it up for their own account.",
    ),
    (
        "admins",
        "Admins and owners must use MFA",
        "Members with a privileged role must set up MFA before their grace period ends; "
        "everyone else chooses.",
    ),
    (
        "all",
        "Everyone must use MFA",
        "Every member must set up MFA before their grace period ends.",
    ),
)

#: Audit actions offered as suggestions in the audit page's action filter.
AUDIT_ACTIONS: tuple[str, ...] = (
    "ip.blocked",
    "mfa.enrolled",
    "mfa.lockout",
    "mfa.recovery_code.used",
    "mfa.recovery_codes.issued",
    "mfa.recovery_codes.regenerated",
    "mfa.removed",
    "mfa.reset",
    "mfa.verify",
    "security.settings.changed",
)

MANAGED_BY_CONFIG_NOTE = (
    "Managed by the deployment's configuration (security.managed_by: config). "
    "Change these settings in the sidecar's YAML file."
)
IP_ORDER_NOTE = "The denylist is evaluated first; an empty allowlist means unrestricted."

_STATUS = '<p class="status" id="mfa-status" role="status" aria-live="polite"></p>'


# --- values the handler formats ------------------------------------------------------------


def describe_duration(seconds: float) -> str:
    """``12 hours``, ``15 minutes``, ``90 seconds``, ``14 days``: the largest unit that fits
    evenly (days only from a week up, so ``72h`` stays ``72 hours``)."""
    for unit, size, minimum in (("day", 86400, 7 * 86400), ("hour", 3600, 1), ("minute", 60, 1)):
        if seconds >= minimum and seconds % size == 0:
            return _plural(int(seconds // size), unit)
    return "1 second" if seconds == 1 else f"{_number(seconds)} seconds"


def describe_lockout(max_failures: int, window: float, ban: float) -> str:
    """``5 failed attempts within 15 minutes pause verification for 15 minutes``."""
    return (
        f"{_plural(max_failures, 'failed attempt')} within {describe_duration(window)} "
        f"pause verification for {describe_duration(ban)} (per user and per address)"
    )


def describe_grace(seconds: float) -> str:
    """A grace period in hours, as the page's input takes it: ``72 hours``, ``1.5 hours``."""
    if seconds <= 0:
        return "no grace period"
    hours = seconds / 3600
    return _plural(int(hours), "hour") if hours == int(hours) else f"{_number(hours)} hours"


def preview_text(preview: Mapping[str, Any]) -> str:
    """``3 users enrolled, 1 would be in grace, 0 would be blocked`` (security.js writes the
    same sentence when the selection changes)."""
    enrolled = int(preview.get("enrolled", 0))
    grace = int(preview.get("grace", 0))
    blocked = int(preview.get("blocked", 0))
    return (
        f"{_plural(enrolled, 'user')} enrolled, {grace} would be in grace, "
        f"{blocked} would be blocked"
    )


# --- pages ---------------------------------------------------------------------------------


def render_security(
    ctx: PageContext,
    *,
    privileged: bool,
    methods: Mapping[str, Any],
    settings: Mapping[str, Any] | None,
    preview: Mapping[str, Any] | None,
    session_lifetime: str,
    verify_every: str,
    lockout: str,
    step_up_url: str | None = None,
) -> str:
    """The Security page.

    ``methods`` is the status API's ``methods`` object (``passkeys`` with ``id``, ``name``,
    ``created_at``, ``last_used_at``; ``totp``; ``recovery_codes_left``). ``settings`` is the
    admin settings JSON (with ``version`` and ``managed_by``), None for members or when it is
    not to be shown. For an admin whose verification is too old for admin changes, pass
    ``settings=None`` and ``step_up_url`` (the verify page with ``next`` back here): the org
    cards are replaced by a "confirm it's you" card. Members (``privileged=False``) see only
    their own methods and the "outside this page" card, whatever else is passed.
    """
    prefix = _prefix(ctx.prefix)
    data: dict[str, str] = {}
    org = ""
    if privileged:
        if settings is not None:
            data["version"] = str(settings.get("version", ""))
            data["managed-by"] = str(settings.get("managed_by", "store"))
            org = _org_cards(prefix, settings, preview)
        elif step_up_url is not None:
            org = _step_up_card(step_up_url)
        else:
            org = """
<section class="card" id="org-unavailable">
  <h2>Organization settings</h2>
  <p class="notice notice-error">The organization's security settings couldn't be loaded.
    Reload the page in a moment.</p>
</section>"""
    audit_link = ""
    if privileged:
        audit_link = (
            f'<a class="button button-small" id="open-audit" href="{_e(prefix)}/audit">'
            "Open audit log</a>"
        )
    body = f"""
{_head(ctx, "Security", audit_link)}
{_STATUS}
<noscript><p class="notice notice-error">Changing these settings needs JavaScript. Turn it on
  for this site and reload the page; until then the forms below can't be used.</p></noscript>
{_personal_card(prefix, methods)}
{org}
{_outside_card(ctx, session_lifetime=session_lifetime, verify_every=verify_every, lockout=lockout)}
"""
    return _layout(title="Security", ctx=ctx, page="security", body=body, data=data)


def render_audit(ctx: PageContext) -> str:
    """The audit log: filters, a table security.js fills from ``/api/admin/audit`` (newest
    first, "Load more" pages back), and export links that work without JavaScript."""
    prefix = _prefix(ctx.prefix)
    api = f"{prefix}/api/admin/audit"
    actions = "".join(f'<option value="{_e(action)}"></option>' for action in AUDIT_ACTIONS)
    columns = ("Time", "Actor", "Client address", "Action", "Target", "Outcome", "Details")
    heads = "".join(f'<th scope="col">{name}</th>' for name in columns)
    back = f'<a class="button button-small" href="{_e(prefix)}/security">Back to Security</a>'
    csv_url = f"{api}?{urlencode({'limit': 1000, 'format': 'csv'})}"
    json_url = f"{api}?{urlencode({'limit': 1000})}"
    body = f"""
{_head(ctx, "Audit log", back)}
{_STATUS}
<noscript><p class="notice notice-error">The table needs JavaScript; the exports below work
  without it.</p></noscript>
<section class="card" aria-labelledby="audit-filter-title">
  <h2 id="audit-filter-title" class="visually-hidden">Filter and export</h2>
  <form id="audit-filters" class="filters" method="get" novalidate>
    <div class="field">
      <label for="audit-action">Action</label>
      <input type="text" id="audit-action" name="action" list="audit-actions" autocomplete="off"
        spellcheck="false" maxlength="100">
      <datalist id="audit-actions">{actions}</datalist>
    </div>
    <div class="field">
      <label for="audit-actor">Actor</label>
      <input type="text" id="audit-actor" name="actor" autocomplete="off" spellcheck="false"
        maxlength="200">
    </div>
    <button type="submit" class="button" id="audit-apply">Filter</button>
  </form>
  <p class="hint">Both filters match exactly; leave them empty to see everything.</p>
  <p class="button-row">
    <a class="button button-small" id="audit-export-csv" href="{_e(csv_url)}"
      download>Export CSV</a>
    <a class="button button-small" id="audit-export-json" href="{_e(json_url)}">Export JSON</a>
  </p>
  <p class="hint">Exports hold the newest 1000 records that match the filters.</p>
</section>
<div class="table-wrap" role="region" aria-labelledby="audit-caption" tabindex="0">
  <table class="audit-table" id="audit-table">
    <caption id="audit-caption">Security events, newest first</caption>
    <thead><tr>{heads}</tr></thead>
    <tbody id="audit-rows"></tbody>
  </table>
</div>
<p class="muted" id="audit-empty" hidden>No audit records match.</p>
<p class="page-foot"><button type="button" class="button" id="audit-more"
  hidden>Load more</button></p>
"""
    return _layout(title="Audit log", ctx=ctx, page="audit", body=body, wide=True)


# --- cards ---------------------------------------------------------------------------------


def _personal_card(prefix: str, methods: Mapping[str, Any]) -> str:
    here = f"{prefix}/security"
    passkeys: Sequence[Mapping[str, Any]] = methods.get("passkeys") or ()
    totp = bool(methods.get("totp"))
    left = int(methods.get("recovery_codes_left") or 0)
    enrolled = totp or bool(passkeys)

    items = "".join(_passkey_item(passkey) for passkey in passkeys)
    add_passkey = f"{prefix}/setup?{urlencode({'next': here})}"
    add_totp = f"{prefix}/setup?{urlencode({'method': 'totp', 'next': here})}"
    if totp:
        totp_row = """<p class="method-row"><span><strong id="totp-state">On</strong>: codes from
    an app on your phone.</span>
    <button type="button" class="button button-small" id="totp-remove"
      aria-label="Remove authenticator app">Remove</button></p>"""
    else:
        totp_row = f"""<p class="method-row"><span><strong id="totp-state">Off</strong></span>
    <a class="button button-small" id="totp-add"
      href="{_e(add_totp)}">Add authenticator app</a></p>"""

    if enrolled:
        warn = " notice notice-warning" if left <= 3 else ""
        recovery = f"""<p id="recovery-left" class="recovery-left{warn}">You have
    {_plural(left, "recovery code")} left. Each one lets you in once if you lose your other
    methods.</p>
  <p><button type="button" class="button"
    id="recovery-regenerate">Regenerate recovery codes</button></p>
  <div id="recovery-new" class="recovery-new" tabindex="-1" hidden>
    <p><strong>Your new recovery codes.</strong> The old ones no longer work. Keep these
      somewhere safe, such as a password manager: they won't be shown again.</p>
    <ol class="codes" id="recovery-codes"></ol>
    <p class="button-row">
      <button type="button" class="button" id="recovery-copy">Copy</button>
      <button type="button" class="button" id="recovery-download">Download</button>
    </p>
  </div>"""
    else:
        recovery = (
            '<p class="muted" id="recovery-left">You get recovery codes when you set up your '
            "first sign-in method.</p>"
        )

    return f"""
<section class="card" id="personal-mfa" aria-labelledby="personal-title">
  <h2 id="personal-title">Your sign-in methods</h2>
  <h3>Passkeys</h3>
  <ul class="method-list" id="passkey-list">{items}</ul>
  <p class="muted" id="passkey-none"{"" if not passkeys else " hidden"}>No passkeys yet.</p>
  <p><a class="button button-small" id="passkey-add" href="{_e(add_passkey)}">Add passkey</a></p>
  <h3>Authenticator app</h3>
  {totp_row}
  <h3>Recovery codes</h3>
  {recovery}
</section>"""


def _passkey_item(passkey: Mapping[str, Any]) -> str:
    name = str(passkey.get("name") or "Passkey")
    last_used = passkey.get("last_used_at")
    used = f"last used {_when(last_used)}" if last_used else "never used"
    credential = _e(str(passkey.get("id", "")))
    return f"""
    <li class="method-row">
      <span><strong>{_e(name)}</strong><br>
        <span class="muted">Added {_when(passkey.get("created_at"))}, {used}</span></span>
      <button type="button" class="button button-small" data-passkey-id="{credential}"
        data-passkey-name="{_e(name)}" aria-label="Remove passkey {_e(name)}">Remove</button>
    </li>"""


def _org_cards(prefix: str, settings: Mapping[str, Any], preview: Mapping[str, Any] | None) -> str:
    managed = settings.get("managed_by") == "config"
    off = " disabled" if managed else ""
    note = ""
    if managed:
        note = f'<p class="notice notice-info managed-note">{_e(MANAGED_BY_CONFIG_NOTE)}</p>'
    policy = str(settings.get("mfa_policy", "optional"))
    grace = float(settings.get("grace_period_seconds") or 0)

    choices = []
    for value, label, meaning in POLICY_CHOICES:
        checked = " checked" if value == policy else ""
        choices.append(f"""
      <div class="choice">
        <input type="radio" id="policy-{value}" name="mfa_policy" value="{value}"
          aria-describedby="policy-{value}-hint"{checked}{off}>
        <label for="policy-{value}">{_e(label)}</label>
        <p class="hint" id="policy-{value}-hint">{_e(meaning)}</p>
      </div>""")

    shown = "" if preview is None else _e(preview_text(preview))
    lists = {
        name: "\n".join(str(line) for line in settings.get(name) or ())
        for name in ("ip_allowlist", "ip_denylist")
    }
    allowlist = _list_field(
        "ip-allowlist", "Allowlist", "Only these addresses may connect.", lists["ip_allowlist"], off
    )
    denylist = _list_field(
        "ip-denylist", "Denylist", "These addresses are always refused.", lists["ip_denylist"], off
    )
    return f"""
<div class="notice notice-error" id="settings-conflict" role="alert" hidden>
  <p><span id="settings-conflict-text"></span>
    <a href="{_e(prefix)}/security" id="settings-reload">Reload the page</a> to see the current
    settings.</p>
</div>
<section class="card" id="policy-card" aria-labelledby="policy-title">
  <h2 id="policy-title">Organization MFA policy</h2>
  {note}
  <form id="policy-form" method="post" novalidate>
    <fieldset disabled data-needs-script>
      <legend class="visually-hidden">MFA policy</legend>
      <fieldset{off}>
        <legend>Who must use MFA</legend>
        {"".join(choices)}
      </fieldset>
      <div class="field">
        <label for="grace-hours">Grace period in hours</label>
        <input type="number" id="grace-hours" name="grace_hours" min="0" step="any"
          inputmode="decimal" value="{_e(_number(grace / 3600))}"
          aria-describedby="grace-hint"{off}>
        <p class="hint" id="grace-hint">How long someone who newly has to use MFA can keep
          working without it. Now: <span id="grace-current">{_e(describe_grace(grace))}</span>.
          Shortening it applies at once; tightening the policy starts new grace periods.</p>
      </div>
      <p class="preview" id="policy-preview" aria-live="polite">{shown}</p>
      <button type="submit" class="button button-primary"
        id="policy-save"{off}>Save policy</button>
    </fieldset>
  </form>
</section>
<section class="card" id="ip-card" aria-labelledby="ip-title">
  <h2 id="ip-title">IP restrictions</h2>
  {note}
  <p class="notice notice-info" id="ip-order-note">{_e(IP_ORDER_NOTE)}</p>
  <form id="ip-form" method="post" novalidate>
    <fieldset disabled data-needs-script>
      <legend class="visually-hidden">IP restrictions</legend>
      {allowlist}
      {denylist}
      <div class="notice notice-warning" id="ip-lockout" role="alert" hidden>
        <p id="ip-lockout-text"></p>
        <p class="button-row"><button type="button" class="button"
          id="ip-save-anyway"{off}>Save anyway</button></p>
      </div>
      <button type="submit" class="button button-primary"
        id="ip-save"{off}>Save IP restrictions</button>
    </fieldset>
  </form>
</section>"""


def _list_field(field_id: str, label: str, meaning: str, value: str, off: str) -> str:
    return f"""<div class="field">
      <label for="{field_id}">{label}</label>
      <textarea id="{field_id}" name="{field_id.replace("-", "_")}" rows="5" spellcheck="false"
        autocomplete="off" autocapitalize="off"
        aria-describedby="{field_id}-hint {field_id}-errors"{off}>{_e(value)}</textarea>
      <p class="hint" id="{field_id}-hint">{meaning} One CIDR per line, such as 203.0.113.0/24
        or 2001:db8::/32; a bare address means just that address.</p>
      <ul class="field-errors" id="{field_id}-errors" hidden></ul>
    </div>"""


def _step_up_card(step_up_url: str) -> str:
    return f"""
<section class="card" id="org-step-up" aria-labelledby="org-step-up-title">
  <h2 id="org-step-up-title">Organization settings</h2>
  <p>To see and change the MFA policy and IP restrictions, confirm it's you first. Admin
    changes need a confirmation from the last 10 minutes.</p>
  <p><a class="button button-primary" href="{_e(local_path(step_up_url))}">Confirm it's you</a></p>
</section>"""


def _outside_card(
    ctx: PageContext, *, session_lifetime: str, verify_every: str, lockout: str
) -> str:
    app = _e(ctx.app_name)
    return f"""
<section class="card" id="outside-card" aria-labelledby="outside-title">
  <h2 id="outside-title">What stays outside this page</h2>
  <p>Session lifetime and password policy are managed by the deployment and by {app}, not
    here.</p>
  <dl class="facts">
    <dt>{app} session lifetime</dt><dd>{_e(session_lifetime)}</dd>
    <dt>Password policy</dt><dd>Managed by {app}</dd>
    <dt>Confirm MFA again after</dt><dd>{_e(verify_every)}</dd>
    <dt>Verification lockout</dt><dd>{_e(lockout)}</dd>
  </dl>
  <p class="hint">The last two are the sidecar's own settings (mfa.verify_every and
    mfa.lockout in its configuration).</p>
</section>"""


# --- layout --------------------------------------------------------------------------------


def _head(ctx: PageContext, title: str, action: str) -> str:
    role = f" ({_e(ctx.role)})" if ctx.role else ""
    return f"""<header class="page-head">
  <p class="app-name">{_e(ctx.app_name)}</p>
  <div class="head-row"><h1>{_e(title)}</h1>{action}</div>
  <p class="muted">Signed in as <strong>{_e(ctx.user)}</strong>{role}</p>
</header>"""


def _layout(
    *,
    title: str,
    ctx: PageContext,
    page: str,
    body: str,
    data: Mapping[str, str] | None = None,
    wide: bool = False,
) -> str:
    """The frame of these pages: mfa.css for looks, security.js (not mfa.js) for behaviour,
    and ``<main>`` carrying what security.js needs."""
    prefix = _prefix(ctx.prefix)
    attrs = {
        "page": page,
        "prefix": prefix,
        "csrf-token": ctx.csrf_token,
        "app-name": ctx.app_name,
        "user": ctx.user,
        **(data or {}),
    }
    data_attrs = "".join(f' data-{name}="{_e(value)}"' for name, value in attrs.items())
    classes = "page page-wide" if wide else "page"
    static = _e(f"{prefix}/static")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="same-origin">
<title>{_e(f"{title} · {ctx.app_name}")}</title>
<link rel="stylesheet" href="{static}/mfa.css">
<script src="{static}/security.js" defer></script>
</head>
<body>
<main class="{classes}"{data_attrs}>{body}</main>
</body>
</html>
"""


def _when(value: object) -> str:
    """An ISO timestamp from the API as a ``<time>``; anything unparsable as plain text."""
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            return _e(str(value))
    return f'<time datetime="{_e(moment.isoformat())}">{_e(format_utc(moment))}</time>'


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}{'' if count == 1 else 's'}"


def _number(value: float) -> str:
    """``72``, ``1.5``: no trailing ``.0`` and never exponent notation."""
    if not math.isfinite(value):
        return "0"
    if value == int(value):
        return str(int(value))
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _prefix(prefix: str) -> str:
    return prefix.rstrip("/")


def _e(value: str) -> str:
    return html.escape(value, quote=True)
