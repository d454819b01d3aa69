"""``sidecar demo``'s key file: created private, kept across restarts."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.demo import _keys


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The most permissive umask: any mode the code does not set itself shows up."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_zero")
def test_key_file_is_private_from_the_moment_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every file descriptor opened on the key file, with its mode at that instant: a
    # write-then-chmod would show a world-readable file here, however briefly.
    modes_at_creation: list[int] = []
    real_open = os.open

    def spying_open(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        fd = real_open(path, flags, *args, **kw)
        if Path(path).name == "keys.json":
            modes_at_creation.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    monkeypatch.setattr(os, "open", spying_open)
    keys = _keys(tmp_path)
    assert modes_at_creation == [0o600]
    assert _mode(tmp_path / "keys.json") == 0o600
    assert set(keys) == {"session", "data"}


@pytest.mark.usefixtures("umask_zero")
def test_keys_are_kept_across_restarts(tmp_path: Path) -> None:
    first = _keys(tmp_path)
    assert _keys(tmp_path) == first
    assert _mode(tmp_path / "keys.json") == 0o600


def test_a_planted_symlink_is_not_written_through(tmp_path: Path) -> None:
    # Someone who can write the data folder points keys.json elsewhere before the first
    # start: the demo must not write fresh keys into the link's target.
    target = tmp_path / "elsewhere"
    (tmp_path / "keys.json").symlink_to(target)
    with pytest.raises(FileNotFoundError):
        _keys(tmp_path)
    assert not target.exists()
