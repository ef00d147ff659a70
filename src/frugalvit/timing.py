"""Wall-clock timing that waits for the device: the one timer the apps and benchmarks share.

On CUDA, kernels run asynchronously: reading a clock right after a call
measures the launch, not the work. `timed` synchronises the device before
starting and before stopping the clock (on the CPU there is nothing to wait for).
`device_timed` measures with CUDA events on a GPU (the device's own clock,
without draining the queue first) and falls back to `timed` elsewhere.
`interleaved_totals` times several functions batch by batch in turn
(`interleaved_seconds`: a method and its baseline; `interleaved_repeats`:
several such passes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

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


def interleaved_totals(functions: Mapping[str, Callable[[Tensor], object]],
                       batches: Sequence[Tensor]) -> dict[str, float]:
    """Seconds of one pass of each function over `batches`, run batch by batch in turn (the order rotating
    from batch to batch, so each goes first as often), each call timed with its batch's device synchronised.

    A method and its baseline timed in separate passes see different machines when
    the machine's speed drifts (a shared VM's can move by +-30 % within minutes);
    in turn, batch by batch, a drift reaches every side alike.
    """
    names = list(functions)
    totals = dict.fromkeys(names, 0.0)
    for index, batch in enumerate(batches):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            totals[name] += timed(functions[name], batch, device=batch.device)[1] / 1e3
    return totals


def interleaved_seconds(first: Callable[[Tensor], object], second: Callable[[Tensor], object],
                        batches: Sequence[Tensor]) -> tuple[float, float]:
    """`interleaved_totals` of two functions: (first's seconds, second's), which goes first alternating."""
    totals = interleaved_totals({"first": first, "second": second}, batches)
    return totals["first"], totals["second"]


def interleaved_repeats(first: Callable[[Tensor], object], second: Callable[[Tensor], object],
                        batches: Sequence[Tensor], repeats: int, warm_up: int = 2
                        ) -> tuple[list[float], list[float], list[float]]:
    """`repeats` passes of `interleaved_seconds` after one untimed over the first `warm_up` batches: each
    side's seconds per pass, and each pass's ratio first / second (a speed-up of `second` over `first`)."""
    interleaved_seconds(first, second, batches[:warm_up])
    first_times, second_times = [], []
    for _ in range(repeats):
        first_seconds, second_seconds = interleaved_seconds(first, second, batches)
        first_times.append(first_seconds)
        second_times.append(second_seconds)
    return first_times, second_times, [a / b for a, b in zip(first_times, second_times)]


class Stopwatch:
    """Elapsed seconds of a span of work on `device` (synchronised at start and at each reading).

    For spans that are not one call: a whole command, a training run.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        synchronize(self.device)
        self.started = time.perf_counter()

    def seconds(self) -> float:
        """Seconds since the stopwatch was made, once the work queued on the device so far has finished."""
        synchronize(self.device)
        return time.perf_counter() - self.started


def device_timed(fn: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """(fn(), its time in milliseconds on `device`): CUDA events around the call on a GPU, `timed` elsewhere.

    On CUDA the events are recorded on the current stream before and after the
    call, and the stop event is waited for; the time includes the host's launch
    time when the device is idle waiting for it, which is what a caller feeding
    frames one by one sees.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return timed(fn, device=device)
    with torch.cuda.device(device):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        stop.record()
    stop.synchronize()
    return out, start.elapsed_time(stop)


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's parameters (CPU / float32 for a model without any)."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype
