""" Shared timing helper of the benchmark scripts: median of CUDA-event timed calls after warm-up. """
from typing import Callable

import torch


def cuda_median_ms(fn: Callable[[], object], iters: int = 10, warmup: int = 3) -> float:
    """Median wall time of fn() on the current CUDA stream, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
