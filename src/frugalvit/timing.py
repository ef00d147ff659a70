"""Wall-clock timing that waits for the device: the one timer the apps and benchmarks share.

On CUDA, kernels run asynchronously: reading a clock right after a call
measures the launch, not the work. `timed` synchronises the device before
starting and before stopping the clock (on the CPU there is nothing to wait for).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Wait until all queued work on `device` has finished (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[..., T], *args: object, device: torch.device | str = "cpu") -> tuple[T, float]:
    """(fn(*args), its wall time in milliseconds), with `device` synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's parameters (CPU / float32 for a model without any)."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype
