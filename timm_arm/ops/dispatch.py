""" The one place that chooses between our Triton kernels, the mamba-ssm / causal-conv1d CUDA kernels and the
plain-PyTorch path.

Backend, in order of precedence: the ``backend`` argument, ``set_backend()``, the ``TIMM_ARM_BACKEND``
environment variable, then ``'auto'``:
    'auto':   for CUDA tensors our Triton kernels (token-major, scan orders inside the kernels; the fastest
              path, benchmarks/RESULTS.md); without triton mamba-ssm / causal-conv1d, without those plain
              PyTorch (warns once); plain PyTorch for any other device
    'triton': our Triton conv + scan, an error without triton or without CUDA tensors
    'cuda':   the mamba-ssm / causal-conv1d kernels (channel-first, scan orders as gathers), an error if they
              are missing or the tensors are not on a GPU
    'torch':  plain PyTorch everywhere

``mixer`` is a whole K-direction Mamba mixer (in-projection, core, out-projection; one autograd node on the Triton
path) and ``mixer_core`` its core (conv, x / dt projections, scan over K directions), for every backend;
``swiglu_mlp`` is a SwiGLU MLP (fc1, silu(gate) * value as one Triton kernel, fc2; one autograd node on the Triton
path); ``selective_scan`` and ``causal_conv1d_silu`` are the single ops in mamba-ssm's channel-first layout;
``add_layer_norm`` is a block's residual add and the LayerNorm after it (one Triton kernel forward wherever the
Triton scan runs).
"""
import functools
import importlib.util
import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .causal_conv1d import causal_conv1d_silu_cuda, causal_conv1d_silu_torch
from .mixer_torch import mixer_core_torch
from .mixer_weights import MixerWeights
from .selective_scan import selective_scan_cuda_fn, selective_scan_torch

__all__ = ['mixer', 'mixer_core', 'MixerWeights', 'swiglu_mlp', 'add_layer_norm', 'selective_scan',
           'causal_conv1d_silu', 'set_backend', 'get_backend', 'resolve_backend', 'choose_backend', 'has_cuda_kernels']

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
    if name == 'triton':
        if not has_triton:
            raise RuntimeError('timm_arm: backend "triton" needs triton installed')
        return 'triton' if op == 'scan' else ('cuda' if has_extension else 'torch')
    # 'auto' on a GPU: the Triton scan path (its conv is in Triton too), else the extensions, else PyTorch
    if op == 'scan' and has_triton:
        return 'triton'
    return 'cuda' if has_extension else 'torch'


@functools.lru_cache(maxsize=None)
def _warn_missing_kernel(op: str, which: str) -> None:
    package = 'mamba-ssm' if op == 'scan' else 'causal-conv1d'
    warnings.warn(
        f'timm_arm: CUDA tensors but neither triton nor {package} is installed; the {op} runs on the slow '
        f'{which} path. Install triton (it comes with torch on Linux) or `pip install timm-arm[cuda]`.',
        RuntimeWarning, stacklevel=4)


def resolve_backend(x: torch.Tensor, backend: Optional[str] = None, op: str = 'conv') -> str:
    """Which implementation of ``op`` ('scan' or 'conv') runs for x: 'cuda', 'triton' or 'torch'."""
    name = _check(backend) if backend is not None else get_backend()
    # Triton's CPU interpreter (TRITON_INTERPRET=1) runs the Triton path on CPU tensors, when asked for by name
    on_gpu = x.device.type == 'cuda' or (name == 'triton' and os.environ.get('TRITON_INTERPRET') == '1')
    has_extension = _importable(_EXTENSIONS[op])
    which = choose_backend(name, on_gpu, op, has_extension, _importable('triton'))
    if on_gpu and name == 'auto' and which == 'torch':
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
        from .triton import selective_scan as selective_scan_triton
        return selective_scan_triton(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus)
    if which == 'cuda':
        # the kernel wants A, D, delta_bias in fp32 and u, delta, B, C, z in one activation dtype
        dtype = u.dtype
        delta, B, C = delta.to(dtype), B.to(dtype), C.to(dtype)
        z = z.to(dtype) if z is not None else None
        D = D.float() if D is not None else None
        delta_bias = delta_bias.float() if delta_bias is not None else None
        return selective_scan_cuda_fn(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


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


def mixer_core(
        xz: torch.Tensor,
        order: Optional[Tuple[torch.Tensor, torch.Tensor]],
        weights: MixerWeights,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """The core of a K-direction Mamba mixer: from the in-projection's output to the out-projection's input.

    xz: (b, L, 2d) = [x, z] per token; order: (scan order, inverse), (K, L) index tensors (None: one direction in
    token order); weights: ``MixerWeights`` (its seven core tensors are read). Per direction k, along its order:
        u = silu(conv(x));  [dt, B, C] = x_proj(u);  y_k = scan(u, dt_proj(dt), A, B, C, D, softplus(. + dt bias))
    returns mean_k(y_k mapped back to token order) * silu(z), (b, L, d).
    """
    scan_backend = resolve_backend(xz, backend, op='scan')
    if scan_backend == 'triton':
        from .triton import mixer_core as mixer_core_triton
        return mixer_core_triton(xz, weights, *(order if order is not None else (None, None)))
    if scan_backend == 'torch':  # direction-major, as CPUs like it
        return mixer_core_torch(xz, order, weights)

    # mamba-ssm's kernels: channel-first, scan orders as gathers
    batch, seqlen, _ = xz.shape
    K, d, N, R = weights.shape
    u = xz[..., :d].transpose(1, 2)  # (b, d, L)
    if order is None:
        u = u.unsqueeze(1)
    else:
        index = order[0].long().view(1, K, 1, seqlen).expand(batch, K, d, seqlen)
        u = u.unsqueeze(1).expand(batch, K, d, seqlen).gather(-1, index)
    u = causal_conv1d_silu(u.reshape(batch, K * d, seqlen), weights.conv_weight.view(K * d, -1),
                           weights.conv_bias.view(-1), backend)
    x_dbl = torch.matmul(weights.x_proj_weight.to(u.dtype), u.view(batch, K, d, seqlen))  # (b, K, R + 2N, L)
    dt, B, C = x_dbl.split([R, N, N], dim=2)
    delta = torch.matmul(weights.dt_proj_weight.to(dt.dtype), dt)  # (b, K, d, L)
    A = -torch.exp(weights.A_log.float())
    y = selective_scan(
        u, delta.reshape(batch, K * d, seqlen), A.reshape(K * d, N), B, C, D=weights.D.reshape(-1),
        delta_bias=weights.dt_proj_bias.reshape(-1), delta_softplus=True, backend=backend,
    ).view(batch, K, d, seqlen)
    if order is None:
        y = y[:, 0]
    else:
        y = y.gather(-1, order[1].long().view(1, K, 1, seqlen).expand(batch, K, d, seqlen)).sum(1) / K
    return y.transpose(1, 2) * F.silu(xz[..., d:])


def mixer(
        x: torch.Tensor,
        order: Optional[Tuple[torch.Tensor, torch.Tensor]],
        weights: MixerWeights,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """A whole K-direction Mamba mixer, x (b, L, dim) -> (b, L, dim): out_proj(mixer_core(in_proj(x))), with the
    weights' in_proj_weight (2d, dim) and out_proj_weight (dim, d) (no biases). Where the Triton scan runs, one
    autograd node (the projections' casts and GEMMs inside it: less host time per layer); else F.linear around
    ``mixer_core``."""
    if weights.in_proj_weight is None or weights.out_proj_weight is None:
        raise ValueError('mixer: the weights need in_proj_weight and out_proj_weight (mixer_core runs without)')
    if resolve_backend(x, backend, op='scan') == 'triton':
        from .triton import mixer as mixer_triton
        return mixer_triton(x, weights, *(order if order is not None else (None, None)))
    return F.linear(mixer_core(F.linear(x, weights.in_proj_weight), order, weights, backend), weights.out_proj_weight)


def swiglu_mlp(
        x: torch.Tensor,
        fc1_weight: torch.Tensor,
        fc1_bias: Optional[torch.Tensor],
        fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor],
        gate_last: bool = False,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """fc2(silu(gate) * value) with [gate; value] = fc1(x), timm GluMlp's split (gate first unless gate_last):
    fc1_weight (2 H, C), fc2_weight (C_out, H).

    Where the Triton scan runs, one autograd node (two GEMMs and one Triton kernel each way). On GPUs the hidden
    width is zero-padded to a multiple of 8 for the GEMMs: ARM's width dim * 8 // 3 is 2730 for ARM-L, and rows of
    2730 bf16 values are not 16-byte aligned, which sends cuBLAS to slow kernels (43 % of ARM-L's inference time on
    an H200). The zero rows / columns add exact zeros."""
    if resolve_backend(x, backend, op='scan') == 'triton':
        from .triton import swiglu_mlp as swiglu_mlp_triton
        return swiglu_mlp_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate_last)
    hidden = fc2_weight.shape[1]
    pad = -hidden % 8 if x.is_cuda else 0
    if pad:  # each half of fc1 (and fc2's input) padded to hidden + pad
        fc1_weight = F.pad(fc1_weight.unflatten(0, (2, hidden)), (0, 0, 0, pad)).flatten(0, 1)
        fc1_bias = F.pad(fc1_bias.unflatten(0, (2, hidden)), (0, pad)).flatten() if fc1_bias is not None else None
        fc2_weight = F.pad(fc2_weight, (0, pad))
    first, second = F.linear(x, fc1_weight, fc1_bias).chunk(2, dim=-1)
    gate, value = (second, first) if gate_last else (first, second)
    return F.linear(F.silu(gate) * value, fc2_weight, fc2_bias)


_LAYER_NORM_MAX_COLS = 16384  # the fused kernel keeps a row in one program's registers


def add_layer_norm(
        residual: torch.Tensor,
        branch: Optional[torch.Tensor],
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        eps: float,
        backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(residual + branch, layer_norm(residual + branch)); branch None: (residual, layer_norm(residual)).

    Without gradients on the GPU paths (and the sum is fp32, as a residual stream under autocast is): one Triton
    kernel reads residual and branch once and writes the sum and the normed output, the latter in the autocast
    dtype when autocast is on (what the next Linear reads: no cast kernel, and no rounding the Linear would not do
    anyway). With gradients, and inside torch.compile (which fuses these itself), PyTorch's add and layer_norm: a
    Python autograd node plus a Triton launch cost more host time than the three ATen ops save on the GPU where
    training steps are partly host-bound (ARM-L on an H200's host).
    """
    total_dtype = residual.dtype if branch is None else torch.promote_types(residual.dtype, branch.dtype)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (residual, branch, weight, bias))
    cols = residual.shape[-1]
    fits = (0 < cols <= _LAYER_NORM_MAX_COLS and residual.numel() > 0 and weight.shape == (cols,)
            and (bias is None or bias.shape == (cols,)) and (branch is None or branch.shape == residual.shape))
    if (total_dtype == torch.float32 and fits and not needs_grad and not torch.compiler.is_compiling()
            and _importable('triton') and resolve_backend(residual, backend, op='scan') != 'torch'):  # GPU paths
        from .triton import add_layer_norm as add_layer_norm_triton
        device = residual.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else total_dtype
        return add_layer_norm_triton(residual, branch, weight, bias, eps, out_dtype)
    total = residual if branch is None else residual + branch
    return total, F.layer_norm(total, total.shape[-1:], weight, bias, eps)
