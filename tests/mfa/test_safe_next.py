"""Where setup and verification send the user next: a path on this site, never the sidecar's
own pages (a loop), never another site however the target is spelled."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from sidecar.mfa.routes import safe_next
from sidecar.paths import with_next
from tests.test_paths import browser_leaves_origin


@pytest.mark.parametrize(
    ("value", "goes_to"),
    [
        pytest.param("/reports?team=ops", "/reports?team=ops", id="console page"),
        pytest.param("/mfa/security", "/mfa/security", id="step-up back to security"),
        pytest.param("/mfa/audit?actor=x", "/mfa/audit?actor=x", id="step-up back to audit"),
        pytest.param("/mfa/setup", "/", id="own page: no loop"),
        pytest.param("/mfa", "/", id="the prefix"),
        pytest.param("/mfax", "/mfax", id="a longer name is the console's"),
        pytest.param(None, "/", id="absent"),
        pytest.param("", "/", id="empty"),
        pytest.param("//evil.example", "/", id="scheme-relative"),
        pytest.param("/\\evil.example", "/", id="slash backslash"),
        pytest.param("/\t/evil.example", "/", id="tab"),
        pytest.param("/\n/evil.example", "/", id="newline"),
        pytest.param("/\\\t\\evil.example", "/", id="backslash tab backslash"),
        pytest.param("https://evil.example/", "/", id="absolute"),
        pytest.param("javascript:alert(1)", "/", id="javascript"),
        pytest.param("/%2F/evil.example", "/%2F/evil.example", id="encoded slash stays a path"),
        pytest.param("/%6Dfa/setup", "/", id="own page, encoded"),
        pytest.param("/x/../mfa/verify", "/", id="own page, dot segments"),
        pytest.param("//mfa/setup", "/", id="own page, doubled slash"),
        pytest.param("/reports?a=1&b=2#top", "/reports?a=1&b=2#top", id="query and fragment kept"),
    ],
)
def test_safe_next(value: str | None, goes_to: str) -> None:
    assert safe_next(value, "/mfa") == goes_to
    assert not browser_leaves_origin(goes_to)


def test_a_next_with_its_own_query_survives_the_round_trip() -> None:
    target = "/reports?team=ops&year=2026#q3"
    location = with_next("/mfa/verify", target)
    assert parse_qs(urlsplit(location).query)["next"] == [target]  # fragment included
    assert urlsplit(location).fragment == ""
