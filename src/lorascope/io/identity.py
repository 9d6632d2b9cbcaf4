"""Whether a file is the one read before: the key of every per-process memo and of the basis cache's."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


def file_identity(path: str | os.PathLike) -> tuple:
    """What says a file is unchanged since it was last read: real path, size, mtime, ctime, inode and
    device (ctime cannot be set by a user: a file rewritten with its mtime restored has a new one).
    Raises OSError when there is no file."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class FileMemo:
    """The last ``size`` values built from files, keyed by the file's identity and ``what`` (the build's
    other arguments): a rewritten file is built again. One build at a time."""

    def __init__(self, size: int):
        self.size = size
        self._values: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, what: Hashable, build: Callable[[], Any]) -> Any:
        key = (*file_identity(path), what)
        with self._lock:
            if key not in self._values:
                self._values[key] = build()
                while len(self._values) > self.size:
                    self._values.popitem(last=False)
            self._values.move_to_end(key)  # most recently used last
            return self._values[key]
