""" Launching compiled Triton kernels with little host time.

Triton's own launch path (``kernel[grid](...)``) binds and specialises every argument again at every launch: the
gate kernel costs 25 us of host time per launch that way and 19 us when its compiled kernel's launcher is called
directly (a quiet H200 host; more with more arguments, and the mixer makes ten launches per layer). ``launch``
goes through Triton the first time it meets an argument signature (Triton compiles or finds the kernel) and calls
the compiled kernel's launcher directly afterwards.

The direct call uses the calling convention of Triton's CUDA launcher, which is not a public API: it is used only
where that launcher has the expected signature (the Triton versions checked are listed under
``[tool.timm_arm] triton-direct-launch`` in pyproject.toml), and ``TIMM_ARM_TRITON_LAUNCH=triton`` in the
environment sends every launch through Triton's public path instead.
"""
import inspect
import os
from functools import lru_cache
from typing import Optional

import torch
import triton

__all__ = ['launch', 'has_register_cap', 'ON_CUDA_COMPILER', 'DIRECT_LAUNCH']

# Triton compiles for an NVIDIA GPU (not its CPU interpreter, not ROCm): inline PTX and libdevice are available
ON_CUDA_COMPILER = os.environ.get('TRITON_INTERPRET') != '1' and torch.version.hip is None


def _direct_launch_supported() -> bool:
    """Whether compiled kernels can be launched through their launcher directly: Triton's CUDA launcher with the
    calling convention of triton 3.3 - 3.8, ``(gridX, gridY, gridZ, stream, function, metadata, launch metadata,
    enter hook, exit hook, *every bound argument)``; never where the environment asks for Triton's own path."""
    if not ON_CUDA_COMPILER or os.environ.get('TIMM_ARM_TRITON_LAUNCH', 'direct').lower() == 'triton':
        return False
    try:
        from triton.backends.nvidia.driver import CudaLauncher
        names = list(inspect.signature(CudaLauncher.__call__).parameters)
    except Exception:  # pragma: no cover - another triton layout: Triton's own launch path
        return False
    return names[:6] == ['self', 'gridX', 'gridY', 'gridZ', 'stream', 'function']


DIRECT_LAUNCH = _direct_launch_supported()
_compiled = {}  # (kernel, device, options, argument properties) -> the CompiledKernel Triton chose for them


@lru_cache(maxsize=None)
def _kernel_params(kernel):
    """(name, default) of every parameter of a @triton.jit function, in order: what its launcher takes."""
    return tuple((name, p.default) for name, p in inspect.signature(kernel.fn).parameters.items())


def launch(kernel, grid, *args, num_warps: int, maxnreg: Optional[int] = None, **constexprs):
    """``kernel[grid](*args, num_warps=..., maxnreg=..., **constexprs)``, directly through the compiled kernel's
    launcher after the first launch with the same argument properties. The cache key holds everything Triton
    specialises on: every non-tensor argument's value, each tensor's dtype and 16-byte alignment, the options, the
    constexprs and the device. Returns the compiled kernel (its ``n_regs`` / ``n_spills``, its assembly)."""
    options = {'num_warps': num_warps}
    if maxnreg is not None:
        options['maxnreg'] = maxnreg
    if not DIRECT_LAUNCH:
        return kernel[grid](*args, **constexprs, **options)
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    key = (kernel, device, num_warps, maxnreg, *constexprs.items(),
           *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args])
    compiled = _compiled.get(key)
    if compiled is None:
        if len(_compiled) > 4096:  # shapes keep changing (e.g. any image size): start over
            _compiled.clear()
        compiled = _compiled[key] = kernel[grid](*args, **constexprs, **options)
        return compiled
    bound = list(args)
    for name, default in _kernel_params(kernel)[len(args):]:
        bound.append(constexprs.get(name, default))
    grid = tuple(grid) + (1, 1)
    compiled.run(grid[0], grid[1], grid[2], driver.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *bound)
    return compiled


@lru_cache(maxsize=None)
def has_register_cap() -> bool:
    """Whether this triton takes a per-kernel register cap (``maxnreg``; older versions do not)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return 'maxnreg' in CUDAOptions.__dataclass_fields__
    except Exception:  # pragma: no cover - another triton layout: run uncapped
        return False
