"""Wall-clock timing of device work: the clock is read only after the device has finished (CUDA runs
asynchronously, so without a synchronize a timed region would measure kernel launches, not the work)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Wait for every queued kernel of `device` (nothing to wait for on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """(fn(), seconds it took, synchronised on `device` before and after)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start
