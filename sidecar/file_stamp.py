"""What tells that the config file changed, for the watchers (``sidecar.reload`` in each
serving process, the workers' supervisor). Imports nothing heavy: ``sidecar run`` takes the
stamp before it reads the file, ahead of prometheus-client's import."""

from __future__ import annotations

from pathlib import Path

#: Modification time, size and inode (an editor that replaces the file changes the inode);
#: None when the file cannot be read.
FileStamp = tuple[int, int, int] | None


def file_stamp(path: Path) -> FileStamp:
    """The stamp of ``path`` now. Taken *before* reading the file, a change made while it is
    read (or later) shows as a different stamp, so a watcher applies it."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)
