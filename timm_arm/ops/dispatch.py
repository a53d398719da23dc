""" The one place that chooses between the CUDA kernels, our Triton scan and the plain-PyTorch path.

Backend, in order of precedence: the ``backend`` argument, ``set_backend()``, the ``TIMM_ARM_BACKEND``
environment variable, then ``'auto'``:
    'auto':   for CUDA tensors mamba-ssm's scan / causal-conv1d's conv when installed; without mamba-ssm our
              Triton scan (far faster and leaner than PyTorch on a GPU), without causal-conv1d PyTorch's conv
              (both warn once); plain PyTorch for any other device
    'cuda':   the mamba-ssm / causal-conv1d kernels, an error if they are missing or the tensors are not on a GPU
    'triton': our Triton selective scan for CUDA tensors (tuned for vision lengths; the conv still takes the
              causal-conv1d kernel when installed). 1.3x faster fwd+bwd than mamba-ssm's scan at L = 197 on an
              H200, but it keeps (b, D, L/4, N) fp32 states for the backward (benchmarks/RESULTS.md)
    'torch':  plain PyTorch everywhere
"""
import functools
import importlib.util
import os
import warnings
from typing import Optional

import torch
import torch.utils.checkpoint

from .causal_conv1d import causal_conv1d_silu_cuda, causal_conv1d_silu_torch
from .selective_scan import selective_scan_cuda_fn, selective_scan_torch

__all__ = ['selective_scan', 'causal_conv1d_silu', 'set_backend', 'get_backend', 'resolve_backend', 'choose_backend',
           'has_cuda_kernels']

_BACKENDS = ('auto', 'cuda', 'torch', 'triton')
_backend_override: Optional[str] = None


_EXTENSIONS = {'scan': 'selective_scan_cuda', 'conv': 'causal_conv1d_cuda'}  # mamba-ssm, causal-conv1d


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def has_cuda_kernels() -> bool:
    """True when mamba-ssm's and causal-conv1d's compiled extensions can be imported."""
    return all(_importable(m) for m in _EXTENSIONS.values())


def _check(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f'timm_arm: unknown backend {name!r}, expected one of {_BACKENDS}')
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide backend (None returns to the environment variable / 'auto')."""
    global _backend_override
    _backend_override = None if name is None else _check(name)


def get_backend() -> str:
    return _backend_override or _check(os.environ.get('TIMM_ARM_BACKEND', 'auto').lower())


def choose_backend(name: str, on_gpu: bool, op: str, has_extension: bool, has_triton: bool) -> str:
    """The implementation of ``op`` ('scan' or 'conv') for backend ``name``: 'cuda', 'triton' or 'torch'."""
    if name == 'torch' or (name == 'auto' and not on_gpu):
        return 'torch'
    if not on_gpu:
        raise RuntimeError(f'timm_arm: backend "{name}" needs CUDA tensors')
    if name == 'cuda':
        if not has_extension:
            raise RuntimeError(
                'timm_arm: backend "cuda" needs mamba-ssm and causal-conv1d (pip install timm-arm[cuda])')
        return 'cuda'
    if name == 'triton' and op == 'scan':
        if not has_triton:
            raise RuntimeError('timm_arm: backend "triton" needs triton installed')
        return 'triton'
    # 'auto' on a GPU, and the conv under 'triton'
    if has_extension:
        return 'cuda'
    return 'triton' if op == 'scan' and has_triton else 'torch'


@functools.lru_cache(maxsize=None)
def _warn_missing_kernel(op: str, which: str) -> None:
    package = 'mamba-ssm' if op == 'scan' else 'causal-conv1d'
    warnings.warn(
        f'timm_arm: CUDA tensors but {package} is not installed; the {op} runs on the {which} path '
        f'({"slow" if which == "torch" else "fast"}). `pip install timm-arm[cuda]` installs the CUDA kernels.',
        RuntimeWarning, stacklevel=4)


def resolve_backend(x: torch.Tensor, backend: Optional[str] = None, op: str = 'conv') -> str:
    """Which implementation of ``op`` ('scan' or 'conv') runs for x: 'cuda', 'triton' or 'torch'."""
    name = _check(backend) if backend is not None else get_backend()
    on_gpu = x.device.type == 'cuda'
    has_extension = _importable(_EXTENSIONS[op])
    which = choose_backend(name, on_gpu, op, has_extension, _importable('triton'))
    if on_gpu and name == 'auto' and not has_extension:
        _warn_missing_kernel(op, which)
    return which


def selective_scan(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor] = None,
        z: Optional[torch.Tensor] = None,
        delta_bias: Optional[torch.Tensor] = None,
        delta_softplus: bool = False,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Selective scan of K stacked directions in one call; see ``timm_arm.ops.selective_scan`` for shapes."""
    which = resolve_backend(u, backend, op='scan')
    if which == 'triton':
        from .triton_scan import selective_scan_triton
        return selective_scan_triton(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus)
    if which == 'cuda':
        # the kernel wants A, D, delta_bias in fp32 and u, delta, B, C, z in one activation dtype
        dtype = u.dtype
        delta, B, C = delta.to(dtype), B.to(dtype), C.to(dtype)
        z = z.to(dtype) if z is not None else None
        D = D.float() if D is not None else None
        delta_bias = delta_bias.float() if delta_bias is not None else None
        return selective_scan_cuda_fn(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:-1]):
        # the PyTorch scan materialises (b, D, L, N) states: keep only its inputs for backward and recompute
        # the rest, so that memory stays at the size of the activations, as with the CUDA kernel
        return torch.utils.checkpoint.checkpoint(selective_scan_torch, *args, use_reentrant=False)
    return selective_scan_torch(*args)


def causal_conv1d_silu(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """silu(depthwise causal conv1d(x)); x: (b, D, L), weight: (D, width), bias: (D,)."""
    if resolve_backend(x, backend) == 'cuda':
        return causal_conv1d_silu_cuda(x, weight.to(x.dtype), bias.to(x.dtype))
    return causal_conv1d_silu_torch(x, weight.to(x.dtype), bias.to(x.dtype))
