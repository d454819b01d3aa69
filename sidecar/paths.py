"""Canonical request paths, so that what the gate matches is exactly what the console gets.

An exemption such as ``/static/`` must not be reachable as ``/static/../settings``,
``/static/%2e%2e/settings`` or ``/static//..//settings``: the console (or a framework in front
of it) would resolve those to ``/settings`` after the gate let them through as "static".
So a request path is canonicalised (RFC 3986 §6.2.2: percent-encoded unreserved characters
decoded, §5.2.4: dot segments removed; repeated slashes collapsed, since many servers treat
``//`` as ``/``) and a request whose path is not canonical is redirected to its canonical
form; every later stage and the upstream only ever see canonical paths.

Separators that servers disagree about (``%2F``, ``%5C``, ``\\``, ``;`` path parameters that
Java servers strip) and ``%25`` (a second round of decoding, as some stacks do, would turn
``%252e`` into ``.``) are left as they are, but a path containing one is never exempt.

Redirect targets (the canonical-path redirect, ``next``, links on the sidecar's pages) are
judged by one rule, :func:`is_local_path`: a browser must resolve them on this origin.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_MULTI_SLASH = re.compile(r"/{2,}")
_AMBIGUOUS = re.compile(r"%2[fF]|%5[cC]|%25|\\|;")
# Never in a local redirect target: "\\" (read as "/") and every control character (C0, DEL,
# C1; browsers silently drop tab, CR and LF, so "/\t/host" would become "//host").
_NOT_IN_LOCAL_PATH = re.compile(r"[\\\x00-\x1f\x7f-\x9f]")


def _decode_unreserved(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))


def canonical_path(raw_path: str) -> str:
    """The canonical form of an origin-form path (without the query); idempotent.

    Decoding can create a new escape from crafted input (``%%32e`` -> ``%2e``), so the steps
    repeat until nothing changes: a server that decodes twice gets nothing new either.
    """
    path = raw_path
    for _ in range(8):
        step = _canonical_once(path)
        if step == path:
            return step
        path = step
    return "/"  # still changing after 8 rounds: hostile input, never a real page


def _canonical_once(raw_path: str) -> str:
    if "%" not in raw_path and "/." not in raw_path and "//" not in raw_path:
        return raw_path  # the common case: already canonical
    path = _UNRESERVED_ESCAPE.sub(_decode_unreserved, raw_path)
    path = _MULTI_SLASH.sub("/", path)
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def is_exempt(path: str, exempt_paths: Sequence[str]) -> bool:
    """Whether a canonical path is under one of ``mfa.exempt_paths``.

    An entry ending in ``/`` is a prefix (``/static/``); any other entry matches itself and
    what lies below it (``/logout`` matches ``/logout`` and ``/logout/all``, not
    ``/logoutx``). Paths with ambiguous separators never match.
    """
    if _AMBIGUOUS.search(path):
        return False
    for entry in exempt_paths:
        if entry.endswith("/"):
            if path.startswith(entry):
                return True
        elif path == entry or path.startswith(entry + "/"):
            return True
    return False


def is_under(path: str, prefix: str) -> bool:
    """Whether a canonical path is the prefix itself or below it."""
    return path == prefix or path.startswith(prefix + "/")


def is_local_path(value: str) -> bool:
    """Whether a browser sent to ``value`` (a ``Location``, a ``next`` target, a link) stays
    on this origin. The one local-redirect rule: every place that judges a redirect target
    calls it, and ``static/mfa.js`` and ``static/security.js`` mirror it.

    Browsers parse such a value with the WHATWG URL Standard's basic URL parser against the
    current URL. Before anything else it strips leading and trailing C0 controls and spaces
    and removes every tab, CR and LF, and for http(s) it reads ``\\`` as ``/`` (both are
    "validation errors" that do not stop parsing). After that, a value starting with ``//`` is
    scheme-relative: another host. So ``/\\evil.example``, and ``/`` + tab + ``/evil.example``,
    both lead to ``evil.example``.

    Rather than predict that cleanup, this refuses any value that would need it: a local path
    starts with exactly one ``/`` and holds no ``\\`` and no control character (C0, DEL, C1)
    anywhere. What is left is a path-absolute reference (RFC 3986 §4.2), which every parser
    resolves on the current origin; escapes such as ``%2F`` and ``%5C`` are not decoded before
    resolution, so they are harmless. Absolute URLs (``https://...``, ``javascript:``) do not
    start with ``/`` and are refused.
    """
    return (
        value.startswith("/")
        and not value.startswith("//")
        and _NOT_IN_LOCAL_PATH.search(value) is None
    )


def local_path_or(value: str | None, default: str = "/") -> str:
    """``value`` when :func:`is_local_path` accepts it, else ``default``."""
    return value if value is not None and is_local_path(value) else default
