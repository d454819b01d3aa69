"""Canonical paths, MFA exemptions and redirect targets: an exemption such as ``/static/`` must
never be a way around the gate to a console page (``/static/../settings`` and its encoded
cousins), and no redirect target may send a browser to another site."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.paths import (
    canonical_path,
    is_exempt,
    is_local_path,
    is_plain,
    is_under,
    local_path_or,
    may_reach_prefix,
)

EXEMPT = ["/logout", "/static/"]


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        # Already canonical: unchanged.
        pytest.param("/", "/", id="root"),
        pytest.param("/settings", "/settings", id="plain"),
        pytest.param("/static/app.js", "/static/app.js", id="static file"),
        pytest.param("/a/b/", "/a/b/", id="trailing slash kept"),
        # Dot segments (RFC 3986 §5.2.4).
        pytest.param("/static/../settings", "/settings", id="dot-dot"),
        pytest.param("/static/./app.js", "/static/app.js", id="dot"),
        pytest.param("/a/b/../../../c", "/c", id="dot-dot above the root"),
        pytest.param("/../../etc/passwd", "/etc/passwd", id="leading dot-dots"),
        pytest.param("/..", "/", id="only dot-dot"),
        pytest.param("/.", "/", id="only dot"),
        pytest.param("/settings/.", "/settings/", id="trailing dot"),
        pytest.param("/static/..", "/", id="trailing dot-dot"),
        pytest.param("/static/../", "/", id="trailing dot-dot slash"),
        pytest.param("/a/b/..", "/a/", id="trailing dot-dot keeps the directory slash"),
        pytest.param("/a/b/.", "/a/b/", id="trailing dot keeps the directory slash"),
        pytest.param("/a/./b/../c/", "/a/c/", id="dots mixed"),
        # Encoded dots are dots.
        pytest.param("/static/%2e%2e/settings", "/settings", id="%2e%2e"),
        pytest.param("/static/%2E%2E/settings", "/settings", id="%2E%2E"),
        pytest.param("/static/%2e./settings", "/settings", id="%2e. mixed"),
        pytest.param("/static/.%2E/settings", "/settings", id=".%2E mixed"),
        pytest.param("/static/%2e/app.js", "/static/app.js", id="%2e single"),
        pytest.param("/static/%2e%2e", "/", id="trailing %2e%2e"),
        # Repeated slashes (many servers read // as /).
        pytest.param("//settings", "/settings", id="leading double slash"),
        pytest.param("/static//..//settings", "/settings", id="double slashes around dot-dot"),
        pytest.param("/a///b", "/a/b", id="triple slash"),
        pytest.param("/static/.//..//settings", "/settings", id="dot then double slashes"),
        # Names that merely contain dots are names.
        pytest.param("/static/...", "/static/...", id="three dots is a name"),
        pytest.param("/static/..a", "/static/..a", id="dot-dot prefix is a name"),
        pytest.param("/static/a..", "/static/a..", id="trailing dots in a name"),
        pytest.param("/static/.well-known", "/static/.well-known", id="dot file"),
        # Encoded unreserved characters are decoded (RFC 3986 §6.2.2.2) ...
        pytest.param("/%7euser", "/~user", id="%7e -> ~"),
        pytest.param("/%7Euser", "/~user", id="%7E -> ~"),
        pytest.param("/%41dmin", "/Admin", id="%41 -> A"),
        pytest.param("/%61%64%6d%69%6e", "/admin", id="lower-case letters"),
        pytest.param("/%2D%5F%30%39%5A%7A", "/-_09Zz", id="unreserved punctuation and ranges"),
        # ... everything else is kept exactly.
        pytest.param("/static/%2F..%2Fsettings", "/static/%2F..%2Fsettings", id="%2F kept"),
        pytest.param("/static/..%2fsettings", "/static/..%2fsettings", id="%2f kept"),
        pytest.param("/a%20b", "/a%20b", id="%20 kept"),
        pytest.param("/%25", "/%25", id="%25 kept"),
        pytest.param("/static/%252e%252e/x", "/static/%252e%252e/x", id="double-encoded kept"),
        pytest.param("/%5C..%5Csettings", "/%5C..%5Csettings", id="%5C kept"),
        pytest.param("/%40%3A", "/%40%3A", id="reserved kept"),
        # Decoding must not leave a new escape behind (a second decode would find it).
        pytest.param("/%%32e", "/", id="%%32e -> %2e -> ."),
        pytest.param("/static/%2%65%2%65/settings", "/settings", id="%2%65 -> %2e"),
        pytest.param("/static/%%32%65%%32%65/settings", "/settings", id="%%32%65 -> %2e"),
        pytest.param(
            "/static/%%%%3332e/settings", "/static/settings", id="escape nested three deep -> ."
        ),
        pytest.param(
            "/static/" + "%" * 13 + "3" * 12 + "2e/settings", "/", id="nested too deep -> /"
        ),
        pytest.param("/%", "/%", id="lone percent"),
        pytest.param("/%zz", "/%zz", id="not hex"),
        pytest.param("/%c3%a9", "/%c3%a9", id="non-ASCII kept encoded"),
    ],
)
def test_canonical_path(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    ("path", "exempt"),
    [
        pytest.param("/logout", True, id="/logout"),
        pytest.param("/logout/", True, id="/logout/"),
        pytest.param("/logout/all", True, id="/logout/all"),
        pytest.param("/logoutx", False, id="/logoutx not exempt"),
        pytest.param("/logout.html", False, id="/logout.html not exempt"),
        pytest.param("/Logout", False, id="case matters"),
        pytest.param("/static/app.js", True, id="/static/ file"),
        pytest.param("/static/", True, id="/static/ itself"),
        pytest.param("/static/css/a.css", True, id="/static/ deeper"),
        pytest.param("/static", False, id="/static without slash is not under /static/"),
        pytest.param("/staticx/app.js", False, id="/staticx"),
        pytest.param("/STATIC/app.js", False, id="/STATIC"),
        pytest.param("/", False, id="root"),
        pytest.param("/settings", False, id="console page"),
        pytest.param("/api/static/x", False, id="exempt name deeper in the path"),
        # Separators that servers disagree about are never exempt.
        pytest.param("/static/..%2Fsettings", False, id="%2F"),
        pytest.param("/static/..%2fsettings", False, id="%2f"),
        pytest.param("/static/..%5Csettings", False, id="%5C"),
        pytest.param("/static/..%5csettings", False, id="%5c"),
        pytest.param("/static/..\\settings", False, id="backslash"),
        pytest.param("/static/app.js;jsessionid=1", False, id="; path parameter"),
        pytest.param("/static/..;/settings", False, id="..; (Tomcat)"),
        pytest.param("/logout;/../settings", False, id="; after /logout"),
        pytest.param("/logout/%2F..%2Fsettings", False, id="%2F under /logout"),
    ],
)
def test_is_exempt(path: str, exempt: bool) -> None:
    assert is_exempt(path, EXEMPT) is exempt


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("/static/../settings", id="dot-dot"),
        pytest.param("/static/%2e%2e/settings", id="%2e%2e"),
        pytest.param("/static/%2E./settings", id="%2E."),
        pytest.param("/static//..//settings", id="double slashes"),
        pytest.param("/static/./../settings", id="dot then dot-dot"),
        pytest.param("/logout/../settings", id="out of /logout"),
        pytest.param("/logout/%2e%2e/settings", id="out of /logout encoded"),
        pytest.param("/static/%2e%2e%2fsettings", id="%2e%2e%2f"),
        pytest.param("/static/..%2F..%2Fsettings", id="%2F"),
    ],
)
def test_attacker_paths_are_not_exempt_once_canonical(raw: str) -> None:
    assert not is_exempt(canonical_path(raw), EXEMPT)


@pytest.mark.parametrize(
    ("path", "under"),
    [
        pytest.param("/mfa", True, id="the prefix"),
        pytest.param("/mfa/", True, id="prefix slash"),
        pytest.param("/mfa/setup", True, id="below"),
        pytest.param("/mfax", False, id="longer name"),
        pytest.param("/mfa-admin", False, id="hyphenated name"),
        pytest.param("/api/mfa", False, id="deeper"),
        pytest.param("/", False, id="root"),
    ],
)
def test_is_under(path: str, under: bool) -> None:
    assert is_under(path, "/mfa") is under


# --- properties ------------------------------------------------------------------------------

# Paths built from the pieces attackers use, plus a few ordinary characters.
PIECES = ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%5c", "\\", ";", "static", "logout"]
CHARS = ["a", "Z", "~", "e", "E", "2", "3", "6", "5", "f", " ", "?", "\x00", "\u00e9"]
ESCAPES = [f"%{b:02X}" for b in range(256)] + [f"%{b:02x}" for b in range(256)]

# Any text after the slash, including malformed escapes ("%", "%z", "%%32").
NASTY = st.lists(st.sampled_from([*PIECES, *CHARS, "%", *ESCAPES]), max_size=16).map(
    lambda parts: "/" + "".join(parts)
)
# Well-formed paths: every "%" starts a complete escape, as RFC 3986 requires.
WELL_FORMED = st.lists(st.sampled_from([*PIECES, *CHARS, *ESCAPES]), max_size=16).map(
    lambda parts: "/" + "".join(parts)
)
ANY_TEXT = st.text(max_size=24).map(lambda text: "/" + text)
# Attempts to leave /static/ (or to look as if inside it).
FROM_STATIC = st.one_of(NASTY, WELL_FORMED).map(lambda path: "/static" + path)


def _segments(path: str) -> list[str]:
    return path.split("/")[1:]


@settings(max_examples=200, deadline=None)
@given(st.one_of(NASTY, ANY_TEXT))
def test_canonical_path_shape(raw: str) -> None:
    path = canonical_path(raw)
    assert path.startswith("/")
    assert "//" not in path
    assert not {".", ".."} & set(_segments(path))
    assert "/./" not in path
    assert "/../" not in path


@settings(max_examples=300, deadline=None)
@given(st.one_of(NASTY, WELL_FORMED, ANY_TEXT))
@example("/%%32e")
@example("/static/%2%65%2%65/settings")
def test_canonical_path_is_idempotent(raw: str) -> None:
    """The redirect target is itself canonical (one redirect, never a chain), and a console
    that decodes once more finds nothing new."""
    once = canonical_path(raw)
    assert canonical_path(once) == once


@settings(max_examples=200, deadline=None)
@given(st.one_of(FROM_STATIC, NASTY))
def test_exemption_of_a_canonical_path_stays_under_the_exemption(raw: str) -> None:
    path = canonical_path(raw)
    if is_exempt(path, ["/static/"]):
        assert path.startswith("/static/")
        # No segment can lead back out of /static/ on the console's side.
        assert ".." not in _segments(path)


@settings(max_examples=100, deadline=None)
@given(
    before=st.text(max_size=8),
    separator=st.sampled_from(["%2f", "%2F", "%5c", "%5C", "\\", ";"]),
    after=st.text(max_size=8),
)
def test_ambiguous_separators_are_never_exempt(before: str, separator: str, after: str) -> None:
    for prefix in ("/static/", "/logout/", "/logout"):
        assert not is_exempt(prefix + before + separator + after, EXEMPT)


# --- escapes that other servers decode ------------------------------------------------------

# How servers we know read a path, written here from their documented habits (not from
# sidecar.paths), one function per habit. A server is any sequence of them.


def _kept_escaped(text: str) -> str:
    return re.sub(r"[\udc80-\udcff]", lambda m: f"%{ord(m[0]) - 0xDC00:02X}", text)


def _strict(path: str) -> str:
    """RFC 3986 percent-decoding as UTF-8; invalid sequences stay escaped (yarl, aiohttp)."""
    return _kept_escaped(unquote(path, errors="surrogateescape"))


def _strict_keeping_separators(path: str) -> str:
    """Decoding that leaves %2F and %5C alone (Apache AllowEncodedSlashes NoDecode, Tomcat)."""
    parts = re.split(r"(%2[fF]|%5[cC])", path)
    return "".join(part if i % 2 else _strict(part) for i, part in enumerate(parts))


def _overlong(path: str) -> str:
    """Pre-2001 UTF-8 decoders (CVE-2000-0884): overlong 2- and 3-byte forms are characters."""
    three = r"%[eE]0%([89][0-9a-fA-F])%([89aAbB][0-9a-fA-F])"
    two = r"%([cC][01])%([89aAbB][0-9a-fA-F])"
    path = re.sub(three, lambda m: chr((int(m[1], 16) & 0x3F) << 6 | int(m[2], 16) & 0x3F), path)
    path = re.sub(two, lambda m: chr((int(m[1], 16) & 0x1F) << 6 | int(m[2], 16) & 0x3F), path)
    return _strict(path)


def _windows(path: str) -> str:
    """Win32 path normalisation: trailing dots and spaces of a segment dropped."""
    out = []
    for segment in path.split("/"):
        stripped = segment.rstrip(". ")
        out.append(stripped if stripped or not segment else "..")
    return "/".join(out)


SERVER_HABITS: dict[str, Callable[[str], str]] = {
    "percent-decode": _strict,
    "percent-decode, not %2F %5C": _strict_keeping_separators,
    "overlong UTF-8": _overlong,
    "IIS %u": lambda path: re.sub(r"%[uU]([0-9A-Fa-f]{4})", lambda m: chr(int(m[1], 16)), path),
    "NFKC": lambda path: unicodedata.normalize("NFKC", path),
    "backslash is slash": lambda path: path.replace("\\", "/"),
    "C string (NUL ends it)": lambda path: path.split("\x00")[0],
    "decoded ? starts the query": lambda path: path.split("?")[0],
    "decoded # starts the fragment": lambda path: path.split("#")[0],
    "; path parameters dropped": lambda path: re.sub(r";[^/]*", "", path),
    "Windows segment ends": _windows,
    "case-insensitive": str.lower,
}


def _resolve(path: str) -> str:
    """RFC 3986 §5.2.4 dot-segment removal with repeated slashes read as one."""
    out: list[str] = []
    segments = re.sub("/{2,}", "/", path).split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".." and out:
            out.pop()
        if segment in (".", ".."):
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def server_readings(path: str, habits: list[str]) -> list[str]:
    """What a server with these habits makes of the path: as read, and with dots resolved."""
    for habit in habits:
        path = SERVER_HABITS[habit](path)
    return [path, _resolve(path)]


@pytest.mark.parametrize(
    "path",
    [
        # Overlong UTF-8 for ".", "/" and "\\".
        pytest.param("/static/%C0%AE%C0%AE/settings", id="%C0%AE"),
        pytest.param("/static/..%C0%AFsettings", id="%C0%AF"),
        pytest.param("/static/%E0%80%AE%E0%80%AE/settings", id="%E0%80%AE"),
        pytest.param("/static/..%C1%9Csettings", id="%C1%9C"),
        pytest.param("/static/..%C1%1Csettings", id="%C1%1C"),
        pytest.param("/static/%F0%80%80%AE%F0%80%80%AE/settings", id="4-byte overlong"),
        pytest.param("/logout/%C0%AE%C0%AE/settings", id="%C0%AE under /logout"),
        # IIS %u escapes and other escapes that are not two hex digits.
        pytest.param("/static/%u002e%u002e/settings", id="%u002e"),
        pytest.param("/static/..%u2215settings", id="%u2215 division slash"),
        pytest.param("/static/..%u002fsettings", id="%u002f"),
        pytest.param("/static/%U002E%U002E/settings", id="%U002E"),
        pytest.param("/static/%%32x", id="leftover %"),
        pytest.param("/static/%", id="lone %"),
        pytest.param("/static/%zz", id="not hex"),
        # NUL and other controls.
        pytest.param("/static/app.js%00/../../settings", id="%00"),
        pytest.param("/logout%00", id="%00 after /logout"),
        pytest.param("/static/%0A", id="%0A"),
        pytest.param("/static/%7F", id="%7F"),
        # Characters whose compatibility form (NFKC) holds ".", "/" or "\\", encoded and raw.
        pytest.param("/static/%EF%BC%8E%EF%BC%8E/settings", id="fullwidth full stop encoded"),
        pytest.param("/static/\uff0e\uff0e/settings", id="fullwidth full stop raw"),
        pytest.param("/static/..%EF%BC%8Fsettings", id="fullwidth solidus"),
        pytest.param("/static/..\uff0fsettings", id="fullwidth solidus raw"),
        pytest.param("/static/..%EF%BC%BCsettings", id="fullwidth reverse solidus"),
        pytest.param("/static/%E2%80%A5/settings", id="two dot leader"),
        pytest.param("/static/\u2025/settings", id="two dot leader raw"),
        pytest.param("/static/%EF%B9%92%EF%B9%92/settings", id="small full stop"),
        pytest.param("/static/..%EF%B9%A8settings", id="small reverse solidus"),
        pytest.param("/static/%E2%80%A4%E2%80%A4/settings", id="one dot leader"),
        # Best-fit code-page mappings (NFKC-stable, but Windows maps them to "/" and "\\").
        pytest.param("/static/..%E2%88%95settings", id="division slash"),
        pytest.param("/static/..\u2215settings", id="division slash raw"),
        pytest.param("/static/..%C2%A5settings", id="yen sign"),
        # Any other non-ASCII, even harmless, and raw non-ASCII bytes.
        pytest.param("/static/caf%C3%A9.png", id="UTF-8 letter"),
        pytest.param("/static/caf\u00e9.png", id="raw letter"),
        pytest.param("/static/%ED%A0%80", id="surrogate"),
        # Segments Windows reads as "..".
        pytest.param("/static/..%20/settings", id="dot-dot space"),
        pytest.param("/static/.../settings", id="three dots"),
        pytest.param("/static/.%20./settings", id="dot space dot"),
    ],
)
def test_escapes_other_servers_decode_are_never_exempt(path: str) -> None:
    assert not is_plain(path)
    assert not is_exempt(path, EXEMPT)
    assert not is_exempt(canonical_path(path), EXEMPT)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/static/app.js", id="plain"),
        pytest.param("/static/a%20b.css", id="encoded space"),
        pytest.param("/static/%40scope/x.js", id="encoded reserved"),
        pytest.param("/static/x.min.js", id="dots in a name"),
        pytest.param("/static/.well-known", id="dot file"),
        pytest.param("/logout", id="/logout"),
    ],
)
def test_plain_paths_stay_exempt(path: str) -> None:
    assert is_plain(path)
    assert is_exempt(path, EXEMPT)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/mfa", id="the prefix"),
        pytest.param("/mfa/setup", id="below"),
        pytest.param("/MFA/setup", id="upper case (IIS)"),
        pytest.param("/Mfa", id="mixed case"),
        pytest.param("/mfa%C0%AFsetup", id="overlong slash"),
        pytest.param("/x/%C0%AE%C0%AE/mfa/setup", id="overlong dots climb into it"),
        pytest.param("/x/%E0%80%AE%E0%80%AE/mfa", id="3-byte overlong dots"),
        pytest.param("/mfa%u002fsetup", id="IIS %u slash"),
        pytest.param("/%u006dfa/setup", id="IIS %u letter"),
        pytest.param("/x/%u002e%u002e/mfa", id="IIS %u dots"),
        pytest.param("/mfa%00.png", id="NUL"),
        pytest.param("/mfa%3Fx", id="decoded ? read as a query"),
        pytest.param("/mfa%23x", id="decoded # read as a fragment"),
        pytest.param("/mfa;x/setup", id="; parameters (Tomcat)"),
        pytest.param("/mfa./setup", id="trailing dot (Windows)"),
        pytest.param("/mfa.;x", id="trailing dot before a ; parameter"),
        pytest.param("/mfa.%00", id="trailing dot before NUL"),
        pytest.param("/mfa%20%3F", id="trailing space before a decoded ?"),
        pytest.param("/mfa%20/setup", id="trailing space (Windows)"),
        pytest.param("/%EF%BD%8Dfa/setup", id="fullwidth letter"),
        pytest.param("/\uff4dfa/setup", id="fullwidth letter raw"),
        pytest.param("/x/%EF%BC%8E%EF%BC%8E/mfa", id="fullwidth dots"),
        pytest.param("/x/%E2%80%A5/mfa", id="two dot leader"),
        pytest.param("/mfa%EF%BC%8Fsetup", id="fullwidth slash"),
        pytest.param("/mfa\\setup", id="backslash"),
        pytest.param("/mfa%5Csetup", id="%5C"),
        pytest.param("/mfa%2Fsetup", id="%2F"),
        pytest.param("/x/..%2Fmfa", id="%2F with dots"),
        pytest.param("/%256dfa", id="double-encoded letter"),
        pytest.param("/x/%252e%252e/mfa", id="double-encoded dots"),
        pytest.param("/y%2Fq/%C0%AE%C0%AE/mfa", id="overlong dots, %2F kept"),
    ],
)
def test_paths_some_server_reads_under_the_prefix(path: str) -> None:
    assert may_reach_prefix(path, "/mfa")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/", id="root"),
        pytest.param("/mfax", id="longer name"),
        pytest.param("/mfa-guide", id="hyphenated name"),
        pytest.param("/docs/mfa", id="deeper"),
        pytest.param("/docs/mfa/caf%C3%A9", id="deeper, non-ASCII"),
        pytest.param("/wiki/Umfang%C3%A4", id="the letters inside a word"),
        pytest.param("/x/%C0%AE%C0%AE", id="overlong dots elsewhere"),
        pytest.param("/static/app.js", id="static file"),
    ],
)
def test_paths_no_server_reads_under_the_prefix(path: str) -> None:
    assert not may_reach_prefix(path, "/mfa")


def test_crafted_paths_beyond_the_work_bound_count_as_reaching_the_prefix() -> None:
    long_path = "/x" + "/%C0%AE%u002e" * 40 + "/mfa"
    assert may_reach_prefix(long_path, "/mfa")
    assert not may_reach_prefix("/x" + "/%C3%A9" * 100, "/mfa")  # no "mfa" anywhere


# Attacker paths: the escapes above and their pieces, drawn evenly from what may become a dot,
# what may become a separator, and the rest (letters of the prefix and of the exemptions).
DOT_LIKE = [".", "..", "...", " ", "%20", "%C0%AE", "%E0%80%AE", "%u002e", "%U002E", "%252e"]
DOT_LIKE += ["%EF%BC%8E", "\uff0e", "%E2%80%A5", "\u2025"]
SLASH_LIKE = ["/", "%2F", "%5C", "\\", "%C0%AF", "%C1%9C", "%u002f", "%252f", "%EF%BC%8F"]
SLASH_LIKE += ["\uff0f", "%E2%88%95", "%C2%A5", ";x", "%00", "%3F", "%23"]
OTHER = ["mfa", "MFA", "m", "fa", "x", "static/", "logout", "a.css", "%u006d", "%256d"]
OTHER += ["%EF%BD%8D", "\uff4d", "%C3%A9", "%C0", "%7F", "%0A", "%25"]
PIECE = st.one_of(st.sampled_from(DOT_LIKE), st.sampled_from(SLASH_LIKE), st.sampled_from(OTHER))
ENCODED = st.lists(PIECE, max_size=10).map(lambda parts: canonical_path("/" + "".join(parts)))

# And paths that are dangerous once decoded: a literal head (an exemption, or just "/"), then
# a tail spelled with a random escape for each character.
SPELLINGS = {
    ".": [".", "%C0%AE", "%E0%80%AE", "%u002e", "%252e", "%EF%BC%8E", "\uff0e", "%E2%80%A4"],
    "/": [
        *("/", "/", "%2F", "%5C", "\\", "%C0%AF", "%C1%9C", "%u002f", "%252f", "%EF%BC%8F"),
        *(";x/", "./", "%20/", ".;x/", ".%00", "%3F", "%23"),
    ],
    "m": ["m", "M", "%u006d", "%256d", "%EF%BD%8D", "\uff4d"],
}
OUT_OF_EXEMPTIONS = [("/static/", "../settings"), ("/static/x/", "../../x"), ("/logout/", "..")]
INTO_THE_PREFIX = [("/", "mfa"), ("/", "mfa/setup"), ("/x/", "../mfa/x"), ("/static/", "../mfa")]


def _spelled(head: str, tail: str) -> st.SearchStrategy[str]:
    letters = [st.sampled_from(SPELLINGS.get(char, [char])) for char in tail]
    return st.tuples(*letters).map(lambda parts: canonical_path(head + "".join(parts)))


LEAVING = st.sampled_from(OUT_OF_EXEMPTIONS).flatmap(lambda pair: _spelled(*pair))
ENTERING = st.sampled_from(INTO_THE_PREFIX).flatmap(lambda pair: _spelled(*pair))
HABITS = st.lists(st.sampled_from(sorted(SERVER_HABITS)), min_size=1, max_size=5)


@settings(max_examples=500, deadline=None)
@given(
    path=st.one_of(LEAVING, LEAVING, ENCODED.map(lambda path: canonical_path("/static" + path))),
    habits=HABITS,
)
@example(path="/static/%C0%AE%C0%AE/settings", habits=["overlong UTF-8"])
@example(path="/static/%EF%BC%8E%EF%BC%8E/settings", habits=["percent-decode", "NFKC"])
def test_an_exempt_path_stays_exempt_on_every_server(path: str, habits: list[str]) -> None:
    """Whatever a server does to an exempt path, it lands under the same exemption."""
    if is_exempt(path, EXEMPT):
        for reading in server_readings(path, habits):
            assert reading.startswith("/static/") or is_under(reading, "/logout"), reading


@settings(max_examples=500, deadline=None)
@given(path=st.one_of(ENTERING, ENCODED), habits=HABITS)
@example(path="/mfa%C0%AFsetup", habits=["overlong UTF-8"])
@example(path="/x/%E2%80%A5/mfa", habits=["percent-decode", "NFKC"])
@example(path="/mfa.;x/setup", habits=["; path parameters dropped", "Windows segment ends"])
def test_what_any_server_reads_under_the_prefix_is_caught(path: str, habits: list[str]) -> None:
    """``may_reach_prefix`` answers yes for every path some server reads under the prefix,
    whatever habits it has and in whatever order it applies them."""
    if any(is_under(reading, "/mfa") for reading in server_readings(path, habits)):
        assert may_reach_prefix(path, "/mfa")


# --- redirect targets ------------------------------------------------------------------------

_C0_AND_SPACE = "".join(map(chr, range(0x21)))
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def browser_leaves_origin(target: str) -> bool:
    """The oracle: whether a browser following ``target`` from an http(s) page may leave its
    origin. Written from the WHATWG URL Standard's basic URL parser, not from the rule under
    test: leading and trailing C0 controls and spaces are stripped, tab/LF/CR removed
    anywhere, ``\\`` read as ``/``; then ``//`` starts another host and a scheme (``https:``,
    ``javascript:``) is not a path on this origin at all."""
    url = target.strip(_C0_AND_SPACE)
    url = re.sub("[\t\n\r]", "", url).replace("\\", "/")
    return url.startswith("//") or _SCHEME.match(url) is not None


@pytest.mark.parametrize(
    ("target", "local"),
    [
        pytest.param("/", True, id="root"),
        pytest.param("/settings", True, id="path"),
        pytest.param("/reports?team=ops&x=//evil", True, id="query with slashes"),
        pytest.param("/a//b", True, id="double slash later"),
        pytest.param("/%2F%2Fevil.example", True, id="encoded slashes are not decoded"),
        pytest.param("/%5Cevil.example", True, id="encoded backslash is not decoded"),
        pytest.param("/caf\u00e9", True, id="non-ASCII path"),
        pytest.param("/x#frag", True, id="fragment"),
        pytest.param("", False, id="empty"),
        pytest.param("settings", False, id="relative"),
        pytest.param("//evil.example", False, id="scheme-relative"),
        pytest.param("///evil.example", False, id="triple slash"),
        pytest.param("/\\evil.example", False, id="slash backslash"),
        pytest.param("\\/evil.example", False, id="backslash slash"),
        pytest.param("\\\\evil.example", False, id="two backslashes"),
        pytest.param("/x\\y", False, id="backslash anywhere"),
        pytest.param("/\t/evil.example", False, id="tab between the slashes"),
        pytest.param("/\n/evil.example", False, id="LF between the slashes"),
        pytest.param("/\r/evil.example", False, id="CR between the slashes"),
        pytest.param("/\\\t\\evil.example", False, id="backslash tab backslash"),
        pytest.param(" //evil.example", False, id="leading space"),
        pytest.param("\x00//evil.example", False, id="leading NUL"),
        pytest.param("/ok\r\nSet-Cookie: x=1", False, id="header injection"),
        pytest.param("/x\x7f", False, id="DEL"),
        pytest.param("/x\x85", False, id="C1 NEL"),
        pytest.param("https://evil.example/", False, id="absolute"),
        pytest.param("javascript:alert(1)", False, id="javascript"),
        pytest.param("http:/evil.example", False, id="scheme with one slash"),
    ],
)
def test_is_local_path(target: str, local: bool) -> None:
    assert is_local_path(target) is local
    assert local_path_or(target, "/home") == (target if local else "/home")
    if local:
        assert not browser_leaves_origin(target)


def test_local_path_or_none() -> None:
    assert local_path_or(None) == "/"


# Redirect-target building blocks: what browsers clean up or reinterpret, and what they don't.
TARGET_PIECES = ["/", "//", "\\", ".", "..", "%2e", "%2f", "%5c", "evil.example", "x", "?", "#"]
TARGET_CHARS = ["\t", "\n", "\r", " ", "\x00", "\x0b", "\x1f", "\x7f", "\x85", "\u3000", ":"]
TARGETS = st.one_of(
    st.lists(st.sampled_from([*TARGET_PIECES, *TARGET_CHARS]), max_size=10).map("".join),
    st.text(max_size=16),
)


@settings(max_examples=500, deadline=None)
@given(TARGETS)
@example("/\\evil.example")
@example("/\t/evil.example")
@example("\t//evil.example")
def test_no_local_path_leaves_the_origin(target: str) -> None:
    if is_local_path(target):
        assert not browser_leaves_origin(target)


SCRIPTS = Path(__file__).resolve().parents[1] / "sidecar" / "mfa" / "static"
_JS_RULE = re.compile(r"const localPath = (\(p\) => .*?);\n", re.DOTALL)
JS_CASES = [
    "/",
    "/settings?x=1",
    "/%5Cx",
    "/caf\u00e9",
    "",
    "x",
    "//evil.example",
    "/\\evil.example",
    "/\t/evil.example",
    "/x\n",
    "/x\x7f",
    "/x\x85",
    "/x\x9f",
    "/x\xa0",
    "https://evil.example",
]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
@pytest.mark.parametrize("script", ["mfa.js", "security.js"])
def test_the_pages_scripts_apply_the_same_rule(script: str) -> None:
    """The JS twin of ``is_local_path`` agrees with it, case by case."""
    node = shutil.which("node")
    assert node
    found = _JS_RULE.search((SCRIPTS / script).read_text())
    assert found, f"{script} no longer defines localPath"
    program = (
        f"const localPath = {found.group(1)};\n"
        "const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        "process.stdout.write(JSON.stringify(cases.map((c) => localPath(c) === c)));"
    )
    result = subprocess.run(
        [node, "-e", program],
        input=json.dumps(JS_CASES),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == [is_local_path(case) for case in JS_CASES]
