"""Shared by the benchmark scripts: peak resident-memory growth of a block of work (Linux /proc)."""
from __future__ import annotations

import ctypes
import os
import threading
import time

from typing_extensions import Self


def rss() -> int:
    """The process's resident-set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Give freed heap back to the OS, so that a following measurement sees only its own working memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Largest resident-set size seen while the block runs (sampled every 5 ms), minus the size at its start."""

    def __enter__(self) -> Self:
        trim()
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start
