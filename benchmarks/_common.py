""" Shared by the benchmark scripts: median of CUDA-event timed calls after warm-up, and what a results file records
about where it was measured (commit, versions, card, date). """
import datetime
import os
import platform
import subprocess
from typing import Any, Callable, Dict

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


def environment() -> Dict[str, Any]:
    """commit (TIMM_ARM_COMMIT, else git), versions, device and date, for a results file."""
    import timm
    commit = os.environ.get('TIMM_ARM_COMMIT', '')
    if not commit:
        try:
            commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = 'unknown'
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'cpu ({torch.get_num_threads()} threads)'
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(commit=commit, date=datetime.date.today().isoformat(), device=device, python=platform.python_version(),
                torch=torch.__version__, triton=triton_version, timm=timm.__version__)
