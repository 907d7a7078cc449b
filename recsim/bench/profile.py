"""`bench.profile=<dir>`: where the time of a training step goes, for the steps after the timed ones.

A step that costs far more than its kernels (issue 12: ~0.3 s per step whatever the batch) is spent on
the host: Python, launches, or waits on the device. Three views answer which, over `bench.profile_steps`
optimiser steps run after the timed ones (so the profiler's own overhead never reaches the timing):

- `ops_by_host_time.txt` / `ops_by_device_time.txt`: torch.profiler's operator table, by self time;
- `host_syncs.txt`: every host-device synchronisation, counted by the Python line that caused it
  (`torch.cuda.set_sync_debug_mode("warn")` turns each one into a warning that names its caller);
- `summary.json`: wall seconds per profiled step beside the device's busy seconds per step (the sum of
  its kernels' self time): when wall >> busy, the device waits on the host.

`trace.json` is the Chrome/Perfetto trace of the same steps.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from pathlib import Path

import lightning
import torch

from recsim.bench.timing import synchronize


class Profiled:
    """`with Profiled(folder, device, steps):` profiles the block into `folder` (the files of the module doc);
    `steps` divides the per-step figures. `summary` is set on exit."""

    def __init__(self, folder: str | Path, device: torch.device, steps: int = 1):
        self.folder, self.device, self.steps = Path(folder), torch.device(device), steps
        self.summary: dict | None = None

    def __enter__(self):
        synchronize(self.device)
        on_gpu = self.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
        if on_gpu:
            torch.cuda.set_sync_debug_mode("warn")
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")  # every sync, not only the first one of each line
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        wall = time.perf_counter() - self._start
        self._prof.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)
        if exc[0] is None:
            self._write(wall)

    def _write(self, wall: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        table = self._prof.key_averages()
        (self.folder / "ops_by_host_time.txt").write_text(table.table(sort_by="self_cpu_time_total", row_limit=40))
        busy = None
        if self.device.type == "cuda":
            (self.folder / "ops_by_device_time.txt").write_text(table.table(sort_by="self_device_time_total", row_limit=40))
            # the device's own events (kernels, copies), not the host ranges that also carry device time
            kernels = [e for e in self._prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
            busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / self.steps
        syncs = Counter(f"{w.filename}:{w.lineno}" for w in self._caught if "synchroniz" in str(w.message))
        (self.folder / "host_syncs.txt").write_text(
            "".join(f"{n / self.steps:8.1f} per step  {where}\n" for where, n in syncs.most_common()) or "none\n")
        self._prof.export_chrome_trace(str(self.folder / "trace.json"))
        self.summary = {"profiled_steps": self.steps, "wall_s_per_step": wall / self.steps,
                        "device_busy_s_per_step": busy, "host_syncs_per_step": sum(syncs.values()) / self.steps,
                        "folder": str(self.folder)}
        (self.folder / "summary.json").write_text(json.dumps(self.summary, indent=2))


class StepProfiler(lightning.Callback):
    """Profiles optimiser steps `first .. last` (1-based, inclusive) of a fit into `folder`."""

    def __init__(self, first: int, last: int, folder: str | Path):
        self.first, self.last, self.folder = first, last, folder
        self._profiled: Profiled | None = None
        self.summary: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # global_step counts finished optimiser steps: this batch belongs to step global_step + 1
        if self._profiled is None and self.summary is None and trainer.global_step + 1 == self.first:
            self._profiled = Profiled(self.folder, pl_module.device, self.last - self.first + 1).__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._profiled is not None and trainer.global_step == self.last:
            self._profiled.__exit__(None, None, None)
            self.summary, self._profiled = self._profiled.summary, None
