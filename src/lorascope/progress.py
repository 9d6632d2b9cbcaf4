"""Progress of long work: the stage being worked on (loading, decomposing, writing) and a count within it.

On a terminal a rich spinner per stage and a transient bar per counted loop; elsewhere (a log file, CI,
a pipe) plain lines: one when a stage starts and ends, and one every ``LOG_EVERY_S`` seconds of a
counted loop, so a long step is never silent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

LOG_EVERY_S = 10.0
T = TypeVar("T")


class Progress:
    """``stage(text)`` around a step, ``track(items, total, text)`` over a counted loop; all silent when
    ``enabled`` is false. ``console``: a rich Console (default: stderr)."""

    def __init__(self, enabled: bool = True, console: Any = None):
        self.enabled = enabled
        if console is None and enabled:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console

    @property
    def live(self) -> bool:
        """A terminal: spinners and bars; otherwise log lines."""
        return bool(self.enabled and self.console.is_terminal)

    def log(self, line: str) -> None:
        if self.enabled:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        if self.live:
            with self.console.status(text):
                yield
            return
        self.log(f"{text} ...")
        yield
        self.log(f"{text}: done in {time.perf_counter() - start:.1f} s")

    def track(self, items: Iterable[T], total: int, text: str) -> Iterator[T]:
        if not self.enabled:
            yield from items
            return
        if self.live:
            from rich.progress import track

            yield from track(items, total=total, description=text, transient=True, console=self.console)
            return
        start = last = time.perf_counter()
        self.log(f"{text}: 0/{total}")
        done = 0
        for item in items:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= LOG_EVERY_S or done == total:
                last = now
                pct = 100 * done / total if total else 100.0
                self.log(f"{text}: {done}/{total} ({pct:.0f}%), {now - start:.1f} s")
