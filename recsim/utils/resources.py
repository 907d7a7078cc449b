"""Wall time and peak memory of an update.

On a GPU the peak is torch's max allocated memory during the update. On CPU it is the peak resident
set size of the process sampled every 50 ms during the update (psutil), which includes the model
itself: say so wherever it is reported.
"""

from __future__ import annotations

import threading
import time

import torch


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
