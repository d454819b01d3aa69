"""The sidecar's HTML pages: pure render functions (values in, HTML string out; no I/O).

Pages: setup (passkey first, authenticator app as the alternative, then recovery codes),
verify, the grace-period interstitial, "sign in first" and a plain error page. The pages do
the talking to the JSON API through ``static/mfa.js``; they hand it the prefix, the CSRF token
and where to go next through ``data-`` attributes on ``<main>``.

Security assumptions:

- Every dynamic value is written through :func:`html.escape` (quotes included), in text and
  in attributes alike.
- ``next`` and ``continue`` targets are re-checked here with ``paths.is_local_path`` (``/x``,
  never ``//host``, ``/\\host``, a tab or newline inside, or ``javascript:``); anything else
  becomes ``/``. The caller validates them already; this is defence in depth against an open
  redirect.
- Codes never travel in URLs. Every form is ``method="post"`` and its controls sit in a
  ``<fieldset disabled data-needs-script>`` that only mfa.js enables (it then sends the
  values to the JSON API in a request body). Without script the forms cannot be submitted at
  all, so the browser's own GET submission cannot put a TOTP or recovery code in the address
  bar, history, server logs or a ``Referer``; ``<noscript>`` says the page needs JavaScript.
  The API reads codes from the JSON body only, never from the query string.
- No inline ``<script>``, no ``<style>`` element, no ``style=`` or ``on*=`` attribute, and only
  same-origin assets, so the pages work under
  ``Content-Security-Policy: default-src 'self'; img-src 'self' data:; style-src 'self'``.
  (The QR code arrives from the API as SVG markup with presentation attributes only.)
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from urllib.parse import urlencode

from sidecar.paths import local_path_or

#: The files ``static_file`` serves, with the content type to send them with.
STATIC_FILES: Mapping[str, str] = {
    "mfa.css": "text/css; charset=utf-8",
    "mfa.js": "text/javascript; charset=utf-8",
    "security.js": "text/javascript; charset=utf-8",
}

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

_PASSKEY_WHAT = (
    "Sign in with Face ID, Touch ID, Windows Hello, your phone or a security key. "
    "There is nothing to type, and a passkey can't be phished."
)
_PASSKEY_SHORT = (
    "With a passkey you confirm it's you with Face ID, Touch ID, Windows Hello, your phone or "
    "a security key: nothing to type."
)


@dataclass(frozen=True)
class PageContext:
    """What every signed-in page needs. ``prefix`` is ``mfa.path_prefix`` (e.g. ``/mfa``),
    ``next_path`` where to go once done, ``app_name`` is ``mfa.rp_name`` (e.g. "Console")."""

    prefix: str
    csrf_token: str
    user: str
    role: str | None
    next_path: str
    app_name: str


def static_file(name: str) -> bytes | None:
    """The bytes of a static asset, or None unless ``name`` is exactly one of ``STATIC_FILES``.

    The allow-list is the path-traversal defence: the name is never joined into a path unless
    it is one of the two fixed names.
    """
    if name not in STATIC_FILES:
        return None
    return resources.files("sidecar.mfa").joinpath("static", name).read_bytes()


def local_path(path: str) -> str:
    """``path`` if a browser resolves it on this origin (``paths.is_local_path``), else ``/``."""
    return local_path_or(path, "/")


def format_utc(moment: datetime) -> str:
    """``3 March 2025, 14:05 UTC`` (naive datetimes are taken to be UTC)."""
    moment = _as_utc(moment)
    return f"{moment.day} {_MONTHS[moment.month - 1]} {moment.year}, {moment:%H:%M} UTC"


def format_relative(moment: datetime, now: datetime) -> str:
    """``in 2 days``, ``in 5 hours``, ``in 12 minutes``, ``3 hours ago``..."""
    seconds = (_as_utc(moment) - _as_utc(now)).total_seconds()
    future = seconds >= 0
    seconds = abs(seconds)
    if seconds < 60:
        return "in less than a minute" if future else "just now"
    if seconds < 3600:
        amount, unit = int(seconds // 60), "minute"
    elif seconds < 36 * 3600:
        amount, unit = max(1, round(seconds / 3600)), "hour"
    else:
        amount, unit = round(seconds / 86400), "day"
    span = f"{amount} {unit}{'' if amount == 1 else 's'}"
    return f"in {span}" if future else f"{span} ago"


# --- pages -----------------------------------------------------------------------------------


def render_setup(
    ctx: PageContext,
    *,
    required: bool,
    grace_deadline: datetime | None,
    enrolled: bool,
    has_totp: bool,
    now: datetime | None = None,
) -> str:
    """The setup page: passkey first, the authenticator app one click away, then the
    recovery-codes step (filled in by mfa.js when the API returns codes)."""
    now = _now(now)
    title = "Add a sign-in method" if enrolled else "Set up passkey MFA"
    app = _e(ctx.app_name)
    blocked = (
        required and not enrolled and grace_deadline is not None and _as_utc(grace_deadline) <= now
    )

    notice = ""
    if required and not enrolled:
        if grace_deadline is None:
            text = f"Your organization requires MFA. Set it up to continue to {app}."
            notice = _notice("warning", text, element_id="setup-requirement")
        elif blocked:
            text = (
                f"Your organization requires MFA. The deadline passed on "
                f"{_time(grace_deadline)}: access to {app} is blocked until you set it up."
            )
            notice = _notice("error", text, element_id="setup-requirement")
        else:
            text = (
                f"Your organization requires MFA. Set it up before {_time(grace_deadline)} "
                f"({_e(format_relative(grace_deadline, now))})."
            )
            notice = _notice("warning", text, element_id="setup-requirement")

    if enrolled:
        intro = f"Add another way to confirm it's you when you sign in to {app}."
    else:
        intro = f"Add a second step to signing in to {app}. A passkey is the quickest."

    totp_note = ""
    if has_totp:
        totp_note = '<p class="muted">An authenticator app is already set up for your account.</p>'

    skip = ""
    if not blocked:
        label = "Back" if enrolled else "Not now"
        skip = (
            f'<p class="page-foot" id="setup-footer">'
            f'<a href="{_e(local_path(ctx.next_path))}">{label}</a></p>'
        )

    body = f"""
{_page_head(ctx, title)}
<p class="lead">{intro}</p>
{notice}
{_STATUS}
<noscript><p class="notice notice-error">This page needs JavaScript to set up MFA. Turn it on
  for this site and reload the page; until then the forms below can't be used.</p></noscript>

<section class="card" id="passkey-section" aria-labelledby="passkey-title">
  <h2 id="passkey-title">Create a passkey</h2>
  <p>{_e(_PASSKEY_WHAT)}</p>
  <p class="notice notice-info" id="passkey-unsupported" hidden>This browser can't create
    passkeys. Use an authenticator app instead.</p>
  <form id="passkey-form" method="post" novalidate>
    <fieldset disabled data-needs-script>
      <legend class="visually-hidden">New passkey</legend>
      <div class="field">
        <label for="passkey-name">Name for this passkey</label>
        <input id="passkey-name" name="name" type="text" value="Passkey" maxlength="64"
          autocomplete="off" required aria-describedby="passkey-name-hint">
        <p class="hint" id="passkey-name-hint">Helps you tell your passkeys apart later,
          for example "Work laptop".</p>
      </div>
      <button type="submit" class="button button-primary"
        id="passkey-create">Create passkey</button>
    </fieldset>
  </form>
  <p class="alternative">
    <button type="button" class="button button-link" id="show-totp"
      aria-controls="totp-section" aria-expanded="false">Use an authenticator app instead</button>
  </p>
</section>

<section class="card" id="totp-section" aria-labelledby="totp-title" tabindex="-1" hidden>
  <h2 id="totp-title">Use an authenticator app</h2>
  {totp_note}
  <p>Use an app such as Google Authenticator, Microsoft Authenticator, 1Password or Bitwarden.
    Scan a QR code with it, then type the 6-digit code it shows.</p>
  <button type="button" class="button" id="totp-begin">Show QR code</button>
  <div id="totp-enroll" hidden>
    <div class="qr" id="totp-qr" role="img" aria-label="QR code for your authenticator app"></div>
    <p>Can't scan it? Enter this key in the app instead:</p>
    <p class="secret-row"><code class="secret" id="totp-secret"></code>
      <button type="button" class="button button-small" id="totp-copy-secret">Copy key</button></p>
    <form id="totp-form" method="post" novalidate>
      <fieldset disabled data-needs-script>
        <legend>Confirm the app works</legend>
        <div class="field">
          <label for="totp-code">6-digit code from the app</label>
          <input id="totp-code" name="code" type="text" inputmode="numeric"
            autocomplete="one-time-code" pattern="[0-9]{{3}}[ \\-]?[0-9]{{3}}" maxlength="7"
            required aria-describedby="totp-code-hint">
          <p class="hint" id="totp-code-hint">The code changes every 30 seconds.</p>
        </div>
        <button type="submit" class="button button-primary" id="totp-submit"
          >Verify and turn on</button>
      </fieldset>
    </form>
  </div>
</section>

<section class="card" id="recovery-step" aria-labelledby="recovery-title" tabindex="-1" hidden>
  <h2 id="recovery-title">Save your recovery codes</h2>
  <p>If you lose your passkey or phone, each of these codes lets you in once. Keep them
    somewhere safe, such as a password manager. They won't be shown again.</p>
  <ol class="codes" id="recovery-codes"></ol>
  <p class="button-row">
    <button type="button" class="button" id="recovery-copy">Copy</button>
    <button type="button" class="button" id="recovery-download">Download</button>
  </p>
  <form id="recovery-form" method="post">
    <fieldset disabled data-needs-script>
      <legend class="visually-hidden">Recovery codes saved</legend>
      <label class="check"><input type="checkbox" id="recovery-saved" required>
        I saved my recovery codes</label>
      <button type="submit" class="button button-primary" id="recovery-continue"
        disabled>Continue</button>
    </fieldset>
  </form>
</section>
{skip}
"""
    return _layout(title=title, ctx=ctx, page="setup", body=body)


def render_verify(
    ctx: PageContext,
    *,
    has_totp: bool,
    has_passkeys: bool,
    locked_until: datetime | None,
    now: datetime | None = None,
) -> str:
    """ "Confirm it's you": passkey first, then the authenticator-app code, then a recovery
    code. The controls are rendered disabled: mfa.js enables them, unless ``locked_until``
    lies ahead (then when it passes)."""
    now = _now(now)
    locked = locked_until is not None and _as_utc(locked_until) > now
    app = _e(ctx.app_name)

    lock_text = ""
    if locked_until is not None and locked:
        lock_text = (
            f"Too many failed attempts. You can try again after {_time(locked_until)} "
            f"({_e(format_relative(locked_until, now))})."
        )
    lockout = f"""
<div class="notice notice-error" id="lockout-notice" role="alert"{"" if locked else " hidden"}>
  <p><strong>Verification is paused.</strong> <span id="lockout-text">{lock_text}</span></p>
</div>"""

    sections = []
    if has_passkeys:
        sections.append("""
<section class="card" id="passkey-verify" aria-labelledby="passkey-verify-title">
  <h2 id="passkey-verify-title">Passkey</h2>
  <p>Use Face ID, Touch ID, Windows Hello, your phone or a security key.</p>
  <p class="notice notice-info" id="passkey-verify-unsupported" hidden>This browser can't use
    passkeys. Use one of the other ways below.</p>
  <button type="button" class="button button-primary" id="passkey-verify-button"
    data-lockable disabled data-needs-script>Use passkey</button>
</section>""")
    if has_totp:
        sections.append("""
<section class="card" aria-labelledby="totp-verify-title">
  <h2 id="totp-verify-title">Authenticator app</h2>
  <form id="totp-verify-form" method="post" novalidate>
    <fieldset data-lockable disabled data-needs-script>
      <legend class="visually-hidden">Code from your authenticator app</legend>
      <div class="field">
        <label for="verify-code">6-digit code from your authenticator app</label>
        <input id="verify-code" name="code" type="text" inputmode="numeric"
          autocomplete="one-time-code" pattern="[0-9]{3}[ \\-]?[0-9]{3}" maxlength="7"
          required>
      </div>
      <button type="submit" class="button button-primary">Verify</button>
    </fieldset>
  </form>
</section>""")
    open_recovery = "" if (has_passkeys or has_totp) else " open"
    sections.append(f"""
<section class="card">
  <details id="recovery-details"{open_recovery}>
    <summary>Use a recovery code</summary>
    <form id="recovery-verify-form" method="post" novalidate>
      <fieldset data-lockable disabled data-needs-script>
        <legend class="visually-hidden">Recovery code</legend>
        <div class="field">
          <label for="recovery-code">Recovery code</label>
          <input id="recovery-code" name="code" type="text" autocomplete="off"
            autocapitalize="characters" spellcheck="false" maxlength="32" required
            aria-describedby="recovery-code-hint">
          <p class="hint" id="recovery-code-hint">One of the codes you saved when you set up
            MFA, like ABCDE-12345. Each code works once.</p>
        </div>
        <button type="submit" class="button">Use recovery code</button>
      </fieldset>
    </form>
  </details>
</section>""")

    body = f"""
{_page_head(ctx, "Confirm it's you")}
<p class="lead">To continue to {app}, confirm it's you with one of your sign-in methods.</p>
{lockout}
{_STATUS}
<noscript><p class="notice notice-error">This page needs JavaScript to confirm it's you.
  Turn it on for this site and reload the page; until then the forms below can't be used.</p>
</noscript>
{"".join(sections)}
"""
    extra = {"locked-until": _as_utc(locked_until).isoformat()} if locked_until and locked else {}
    return _layout(title="Confirm it's you", ctx=ctx, page="verify", body=body, data=extra)


def render_grace_interstitial(
    ctx: PageContext, *, deadline: datetime, continue_url: str, now: datetime | None = None
) -> str:
    """Shown once per session during the grace period. "Set up now" goes to the setup page
    with ``next=ctx.next_path``; "Continue" goes on to ``continue_url``. Works without JS."""
    now = _now(now)
    setup_url = f"{_prefix(ctx.prefix)}/setup?{urlencode({'next': local_path(ctx.next_path)})}"
    body = f"""
{_page_head(ctx, "Set up MFA soon")}
<section class="card">
  <p class="lead">Your organization requires MFA for {_e(ctx.app_name)}. Set it up before
    {_time(deadline)} ({_e(format_relative(deadline, now))}).</p>
  <p>After that, you won't be able to use {_e(ctx.app_name)} until you do. It takes about a
    minute. {_e(_PASSKEY_SHORT)}</p>
  <p class="button-row">
    <a class="button button-primary" href="{_e(setup_url)}">Set up now</a>
    <a class="button" href="{_e(local_path(continue_url))}">Continue</a>
  </p>
</section>
"""
    return _layout(title="Set up MFA soon", ctx=ctx, page="grace", body=body, script=False)


def render_signin_required(prefix: str, app_name: str) -> str:
    """For an anonymous visitor on a sidecar page: sign in to the console first."""
    title = f"Sign in to {app_name} first"
    body = f"""
<header class="page-head"><h1>{_e(title)}</h1></header>
<section class="card">
  <p>You need to be signed in to {_e(app_name)} to set up or confirm MFA.</p>
  <p class="button-row"><a class="button button-primary" href="/">Go to {_e(app_name)}</a></p>
</section>
"""
    return _document(title=title, prefix=prefix, main=f'<main class="page">{body}</main>')


def render_error(
    title: str, message: str, *, status_hint: str | None = None, prefix: str | None = None
) -> str:
    """A plain error page. With ``prefix`` it is styled; without, it is bare but readable."""
    hint = f'<p class="muted">{_e(status_hint)}</p>' if status_hint else ""
    body = f"""
<header class="page-head"><h1>{_e(title)}</h1></header>
<section class="card">
  <p>{_e(message)}</p>
  {hint}
  <p><a href="/">Go to the home page</a></p>
</section>
"""
    return _document(title=title, prefix=prefix, main=f'<main class="page">{body}</main>')


# --- layout ----------------------------------------------------------------------------------

_STATUS = '<p class="status" id="mfa-status" role="status" aria-live="polite"></p>'


def _layout(
    *,
    title: str,
    ctx: PageContext,
    page: str,
    body: str,
    data: Mapping[str, str] | None = None,
    script: bool = True,
) -> str:
    """The shared frame of signed-in pages: ``<main>`` carries what mfa.js needs."""
    attrs = {
        "page": page,
        "prefix": _prefix(ctx.prefix),
        "csrf-token": ctx.csrf_token,
        "next-path": local_path(ctx.next_path),
        "app-name": ctx.app_name,
        "user": ctx.user,
        **(data or {}),
    }
    data_attrs = "".join(f' data-{name}="{_e(value)}"' for name, value in attrs.items())
    main = f'<main class="page"{data_attrs}>{body}</main>'
    return _document(title=f"{title} · {ctx.app_name}", prefix=ctx.prefix, main=main, script=script)


def _document(*, title: str, prefix: str | None, main: str, script: bool = False) -> str:
    assets = ""
    if prefix is not None:
        static = f"{_prefix(prefix)}/static"
        assets = f'<link rel="stylesheet" href="{_e(static)}/mfa.css">\n'
        if script:
            assets += f'<script src="{_e(static)}/mfa.js" defer></script>\n'
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="same-origin">
<title>{_e(title)}</title>
{assets}</head>
<body>
{main}
</body>
</html>
"""


def _page_head(ctx: PageContext, title: str) -> str:
    role = f" ({_e(ctx.role)})" if ctx.role else ""
    return f"""<header class="page-head">
  <p class="app-name">{_e(ctx.app_name)}</p>
  <h1>{_e(title)}</h1>
  <p class="muted">Signed in as <strong>{_e(ctx.user)}</strong>{role}</p>
</header>"""


def _notice(kind: str, html_text: str, *, element_id: str | None = None) -> str:
    """A notice box; ``html_text`` is already escaped markup."""
    id_attr = f' id="{element_id}"' if element_id else ""
    return f'<p class="notice notice-{kind}"{id_attr}>{html_text}</p>'


def _time(moment: datetime) -> str:
    iso = _as_utc(moment).isoformat()
    return f'<time datetime="{_e(iso)}">{_e(format_utc(moment))}</time>'


def _prefix(prefix: str) -> str:
    return prefix.rstrip("/")


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _now(now: datetime | None) -> datetime:
    return _as_utc(now) if now is not None else datetime.now(UTC)


def _e(value: str) -> str:
    return html.escape(value, quote=True)
