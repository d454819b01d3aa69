"""Canonical paths, MFA exemptions and redirect targets: an exemption such as ``/static/`` must
never be a way around the gate to a console page (``/static/../settings`` and its encoded
cousins), and no redirect target may send a browser to another site."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.paths import canonical_path, is_exempt, is_local_path, is_under, local_path_or

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
