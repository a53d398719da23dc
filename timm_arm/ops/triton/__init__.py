""" Triton kernels for ARM's mixer and blocks, one module per kernel family (``scan``, ``scan_backward``,
``conv``, ``gate``, ``swiglu``, ``layer_norm``), their launcher (``launch``) and the PyTorch ops built on them
(``interface``). Importing this package needs triton; ``timm_arm.ops.dispatch`` imports it only where it runs."""
from .interface import add_layer_norm, mixer, mixer_core, selective_scan, selective_scan_tokens, swiglu_mlp
from .scan import ScanConfig, scan_config
