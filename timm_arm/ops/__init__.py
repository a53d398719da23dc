from .dispatch import (
    causal_conv1d_silu, choose_backend, mixer_core, swiglu, get_backend, has_cuda_kernels, resolve_backend, selective_scan, set_backend)
from .selective_scan import selective_scan_sequential, selective_scan_torch
