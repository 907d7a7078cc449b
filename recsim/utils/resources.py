"""Wall time and peak memory of an update.

On a GPU the peak is torch's max allocated memory during the update. On CPU it is the peak resident
set size of the process sampled every 50 ms during the update (psutil), which includes the model
itself: say so wherever it is reported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def reuse_freed_memory() -> bool:
    """Keep freed large blocks in the heap instead of returning them to the OS (glibc only).

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so a CPU training
    step that allocates a [batch, items] logits block pays page faults and zeroing at every step (SASRec
    on Beauty spent half its CPU time in the kernel). With mmap off and a 1 GB trim threshold the blocks
    are reused. Returns whether the setting was applied (False off glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


class UpdateMeter:
    def __enter__(self):
        self.start = time.perf_counter()
        self.peak = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop = threading.Event()

        def sample():
            import psutil  # CPU only; a GPU machine may not have it

            proc = psutil.Process()
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        if not torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if torch.cuda.is_available():
            self.peak_mb, self.memory_kind = torch.cuda.max_memory_allocated() / 2**20, "gpu_allocated"
        else:
            self.peak_mb, self.memory_kind = self.peak / 2**20, "cpu_rss"
        return False
