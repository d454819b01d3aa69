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

Exemptions match only *plain* paths (:func:`is_plain`), because servers also disagree about
everything outside printable ASCII. Some decode overlong UTF-8 (to a lenient decoder
``%C0%AE`` is ``.`` and ``%C0%AF`` is ``/``: CVE-2000-0884 in IIS; ``%E0%80%AE`` is ``.`` and
``%C1%9C`` is ``\\``), IIS decodes ``%u002e`` and ``%u2215``, C code stops at ``%00``, and
Unicode-aware stacks apply compatibility normalisation (NFKC turns the fullwidth full stop
U+FF0E into ``.``, the fullwidth solidus U+FF0F into ``/``, U+2025 into ``..``) or Windows
"best fit" code-page mappings (U+2215 into ``/``, U+00A5 into ``\\``), of which no list is
complete. So the rule is short: a path is plain when every ``%`` starts a two-hex-digit
escape, the decoded path is printable ASCII (no NUL or other control, no byte of 0x80 or
above, so no UTF-8 at all), it holds none of the separators above, and no segment is made
only of dots and spaces (Windows drops trailing dots and spaces, so ``..%20`` and ``...`` may
mean ``..``). A path that is not plain is simply not exempt: it faces the MFA gate like any
console page, whatever the console makes of it. (Static files with non-ASCII names are then
served only to users who pass the gate.)

The same readings decide what is never forwarded: :func:`may_reach_prefix` says whether any
of them (overlong UTF-8, ``%u``, repeated decoding, NFKC, ``\\``, case, ``;`` parameters,
truncation at NUL, ``?`` or ``#``, trailing dots and spaces) turns a path into one under
``mfa.path_prefix``; the proxy answers 404 to those instead of handing them to the console.

Redirect targets (the canonical-path redirect, ``next``, links on the sidecar's pages) are
judged by one rule, :func:`is_local_path`: a browser must resolve them on this origin.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from urllib.parse import quote

_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_MULTI_SLASH = re.compile(r"/{2,}")
_AMBIGUOUS = re.compile(r"%2[fF]|%5[cC]|%25|\\|;")
# Never in a local redirect target: "\\" (read as "/") and every control character (C0, DEL,
# C1; browsers silently drop tab, CR and LF, so "/\t/host" would become "//host").
_NOT_IN_LOCAL_PATH = re.compile(r"[\\\x00-\x1f\x7f-\x9f]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_ESCAPE_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_NOT_AN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")  # "%u002e" (IIS), "%zz", a lone "%"
_IIS_ESCAPE = re.compile(r"%[uU]([0-9A-Fa-f]{4})")
_DOTS_AND_SPACES = re.compile(r"[. ]+")
_PATH_PARAMETER = re.compile(r";[^/]*")
_ANY_SEPARATOR = re.compile(r"[/\\;\x00?#]")
_SEPARATOR_ESCAPE = re.compile(r"(%2[fF]|%5[cC])")
_ESCAPED_BYTE = re.compile(r"[\udc80-\udcff]")
# Anything but printable ASCII without "%", ";" and "\\": a path another server may decode.
_NEEDS_DECODING = re.compile(r"[^\x21-\x24\x26-\x3a\x3c-\x5b\x5d-\x7e]")


def _decoded_byte(match: re.Match[str]) -> str:
    """The character whose code the hex digits of group 1 spell (``%XX``, IIS ``%uXXXX``)."""
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
    return _remove_dot_segments(_UNRESERVED_ESCAPE.sub(_decoded_byte, raw_path))


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on a path starting with ``/``, repeated slashes read as one."""
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
    ``/logoutx``). Only plain paths (:func:`is_plain`) match: ambiguous separators, escapes
    other servers decode differently and anything outside printable ASCII never do.
    """
    under = any(
        path.startswith(entry) if entry.endswith("/") else is_under(path, entry)
        for entry in exempt_paths
    )
    return under and is_plain(path)  # in that order: most paths are under no exemption


def is_under(path: str, prefix: str) -> bool:
    """Whether a canonical path is the prefix itself or below it."""
    return path == prefix or path.startswith(prefix + "/")


def is_plain(path: str) -> bool:
    """Whether every server reads this raw path as the same characters (the module docstring
    says why): well-formed escapes only, printable ASCII once decoded, no separator servers
    disagree about, and no segment made only of dots and spaces."""
    if _NOT_AN_ESCAPE.search(path) or _AMBIGUOUS.search(path):
        return False
    decoded = _ESCAPE.sub(_decoded_byte, path)
    if not (decoded.isascii() and decoded.isprintable()):
        return False
    return not any(_DOTS_AND_SPACES.fullmatch(segment) for segment in decoded.split("/"))


def may_reach_prefix(raw_path: str, prefix: str) -> bool:
    """Whether some server may read this raw path as ``prefix`` or a path below it.

    The sidecar's routes live under the prefix and are never forwarded. The router and the
    MFA gate judge aiohttp's reading of the path, but the console, or a server between, may
    read it differently (the module docstring lists how). The readings considered are every
    combination of those habits, applied in the order a server meets them (decoding and
    normalisation, twice, then truncation, ``;`` parameters, trailing dots and spaces), each
    taken with and without dot segments resolved and compared case-insensitively. This is
    deliberately generous: a false "yes" costs a 404 on a path no browser sends. To bound the
    work an attacker can ask for, a path with more than ``_MAX_READINGS`` readings, or longer
    than ``_MAX_WORKED_OUT`` and spelling the prefix's names once fully decoded, is answered
    "yes" without working out every reading.
    """
    target = prefix.casefold()
    if _NEEDS_DECODING.search(raw_path) is None:
        # The common case: nothing to decode; only case and trailing dots can differ.
        text = raw_path.lower()
        return _lands_under(text, target) or (
            "." in text and _lands_under(_strip_segment_ends(text), target)
        )
    # A segment of any reading is a piece of the most decoded reading, cut at a separator
    # (decoding only adds separators; truncation and ";" cut at one), trailing dots and
    # spaces dropped. When the prefix's names are not among those pieces, no reading is under
    # it, and the combinations need not be worked out.
    pieces = {piece.rstrip(". ") for piece in _ANY_SEPARATOR.split(_most_decoded(raw_path))}
    if not all(name in pieces for name in target.split("/")[1:]):
        return False
    if len(raw_path) > _MAX_WORKED_OUT:
        return True
    readings = {raw_path}
    for habit in _HABITS:
        readings |= {habit(reading) for reading in readings}
        if len(readings) > _MAX_READINGS:
            return True
    return any(_lands_under(reading.casefold(), target) for reading in readings)


def _lands_under(reading: str, target: str) -> bool:
    if is_under(reading, target):
        return True
    return ("/." in reading or "//" in reading) and is_under(_remove_dot_segments(reading), target)


def _most_decoded(raw_path: str) -> str:
    """Every decoding and normalisation applied until nothing changes, casefolded."""
    text = raw_path
    for _ in range(8):
        step = _nfkc(_decode(_decode_iis(text), loose=True, keep_separators=False))
        if step == text:
            break
        text = step
    return text.casefold()


def _decode_iis(text: str) -> str:
    """IIS's ``%uXXXX``: one UTF-16 code unit."""
    return _IIS_ESCAPE.sub(_decoded_byte, text)


def _decode(text: str, *, loose: bool, keep_separators: bool) -> str:
    """One round of percent-decoding. Runs of escapes are UTF-8: strictly (invalid sequences
    stay escaped, as yarl leaves them) or loosely (overlong forms decoded, stray bytes read as
    Latin-1). ``keep_separators`` leaves ``%2F`` and ``%5C`` alone (Apache, Tomcat)."""

    def run(match: re.Match[str]) -> str:
        if not keep_separators:
            return _text_of(match[0], loose=loose)
        # split() with a group keeps the separators: at the odd indexes, left as they are.
        pieces = _SEPARATOR_ESCAPE.split(match[0])
        return "".join(
            piece if i % 2 else _text_of(piece, loose=loose) for i, piece in enumerate(pieces)
        )

    return _ESCAPE_RUN.sub(run, text)


def _text_of(escapes: str, *, loose: bool) -> str:
    data = bytes.fromhex(escapes.replace("%", ""))
    return _loose_utf8(data) if loose else _strict_utf8(data)


def _strict_utf8(data: bytes) -> str:
    text = data.decode("utf-8", errors="surrogateescape")
    return _ESCAPED_BYTE.sub(lambda match: f"%{ord(match[0]) - 0xDC00:02X}", text)


def _loose_utf8(data: bytes) -> str:
    """UTF-8 as pre-2001 decoders read it: a lead byte and its continuation bytes give the
    code point they spell, overlong (``C0 AE`` is ``.``) or not; stray bytes are Latin-1."""
    try:
        return data.decode("utf-8")  # valid UTF-8 reads the same either way
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    i = 0
    while i < len(data):
        lead = data[i]
        size = next((n for n, top in _LEAD_BYTES if lead < top), 1) if lead >= 0xC0 else 1
        tail = data[i + 1 : i + size]
        if size > 1 and len(tail) == size - 1 and all(0x80 <= b < 0xC0 for b in tail):
            code = lead & (0x7F >> size)
            for byte in tail:
                code = code << 6 | byte & 0x3F
            if code <= 0x10FFFF:
                out.append(chr(code))
                i += size
                continue
        out.append(chr(lead))
        i += 1
    return "".join(out)


# Sequence length by lead byte: 2 bytes below 0xE0, 3 below 0xF0, ..., 6 below 0xFE.
_LEAD_BYTES = ((2, 0xE0), (3, 0xF0), (4, 0xF8), (5, 0xFC), (6, 0xFE))


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _strip_segment_ends(path: str) -> str:
    """Each segment as Windows reads it: trailing dots and spaces dropped; a segment of only
    dots and spaces read as ``..`` (the reading that climbs)."""
    segments = []
    for segment in path.split("/"):
        stripped = segment.rstrip(". ")
        segments.append(stripped if stripped or not segment else "..")
    return "/".join(segments)


def _truncate_at(char: str) -> Callable[[str], str]:
    return lambda text: text.split(char, 1)[0]


# One round of what servers do to a path before routing it; each habit is taken or not.
_DECODING_ROUND: tuple[Callable[[str], str], ...] = (
    _decode_iis,
    functools.partial(_decode, loose=False, keep_separators=True),
    functools.partial(_decode, loose=False, keep_separators=False),
    functools.partial(_decode, loose=True, keep_separators=True),
    functools.partial(_decode, loose=True, keep_separators=False),
    _nfkc,
    lambda text: text.replace("\\", "/"),
)
_HABITS: tuple[Callable[[str], str], ...] = (
    *_DECODING_ROUND,
    *_DECODING_ROUND,  # double decoding: "%252e" is "%2e", then "."
    _truncate_at("\x00"),  # C strings
    _truncate_at("?"),  # a decoded "%3F" read again as the start of the query
    _truncate_at("#"),
    lambda text: _PATH_PARAMETER.sub("", text),  # Java servlet containers
    _strip_segment_ends,  # Windows
)
#: Bounds on the work for one path (only crafted paths come near them): more readings, or a
#: longer path that spells the prefix's names somewhere, count as reaching the prefix.
_MAX_READINGS = 32
_MAX_WORKED_OUT = 256


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


def with_next(location: str, next_path: str) -> str:
    """``location?next=<next_path>``, the target percent-encoded so that its own ``&``, ``#``
    or ``?`` stay part of it (the receiving page checks it again with ``safe_next``)."""
    return f"{location}?next={quote(next_path, safe='/')}"
