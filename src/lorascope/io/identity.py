"""Whether a file is the one read before: the key of every per-process memo and of the basis cache's."""

from __future__ import annotations

import os


def file_identity(path: str | os.PathLike) -> tuple:
    """What says a file is unchanged since it was last read: real path, size, mtime, ctime, inode and
    device (ctime cannot be set by a user: a file rewritten with its mtime restored has a new one).
    Raises OSError when there is no file."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
