"""Peak memory of one run.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset at the start (tensors
only, the number that decides whether a run fits). CPU: the peak resident set
size of the process while the run lasts, sampled every 5 ms from
``/proc/self/statm`` by a daemon thread (the operating system's view: the
interpreter, libraries and the base model included, and memory the allocator
keeps after a free, so later runs in one process inherit earlier peaks). On a
platform without ``/proc`` the process's lifetime peak (``ru_maxrss``).
"""

from __future__ import annotations

import os
import threading

import torch


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as pm: …`` then ``pm.peak`` (bytes) and ``pm.kind``."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.kind = "cuda max allocated" if device.type == "cuda" else "cpu peak rss"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _rss() is not None:
            self.peak = _rss() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss() or 0)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss() or 0)
        else:
            import resource

            self.peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
