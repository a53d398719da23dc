from .dispatch import (
    MixerWeights,
    add_layer_norm,
    causal_conv1d_silu,
    choose_backend,
    get_backend,
    has_cuda_kernels,
    mixer,
    mixer_core,
    resolve_backend,
    selective_scan,
    set_backend,
    swiglu_mlp,
)
from .selective_scan import selective_scan_sequential, selective_scan_torch
