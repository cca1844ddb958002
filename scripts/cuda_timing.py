"""CUDA-event timing shared by the GPU scripts beside this file (they import it as `cuda_timing`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(
    fn: Callable[[], object], reps: int = 20, warmup: int = 3, before: Callable[[], object] | None = None
) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream over `reps` calls, after `warmup` calls;
    `before()` runs ahead of each timed call, outside the events (e.g. a barrier across ranks)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)
