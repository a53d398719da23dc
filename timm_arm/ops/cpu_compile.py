""" Elementwise pieces of the PyTorch path compiled with torch.compile on CPUs: one fused C++ loop reads and writes
each tensor once where eager PyTorch makes a pass over memory per operation, and uses vectorised exp / log where
ATen's softplus does not. Used for the selective scan's steps and for softplus; on 2 cores the whole tiny model's
forward runs about 1.3x faster (benchmarks/RESULTS.md).

Where torch.compile cannot build (no C++ compiler, an unsupported platform) the first call warns once and everything
runs eagerly from then on; TIMM_ARM_COMPILE_CPU=0 skips the attempt. Inside a compilation of a whole model (where the
model is traced anyway) and for tensors not on a CPU the eager functions run.
"""
import os
import textwrap
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ['CompiledOnCpu', 'softplus']


class CompiledOnCpu:
    """``fn``, compiled with torch.compile at its first call on CPU tensors; ``fn`` itself where that cannot work."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled = None
        self.failed = False
        self.succeeded = False

    def active(self, x: torch.Tensor) -> bool:
        """Whether a call with x takes the compiled function."""
        return (x.device.type == 'cpu' and not self.failed and not torch.compiler.is_compiling()
                and os.environ.get('TIMM_ARM_COMPILE_CPU', '1') != '0')

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn)
        if self.succeeded:
            return self.compiled(*args)
        try:
            out = self.compiled(*args)
        except Exception as error:  # the first build failed: eager from now on
            self.failed = True
            first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), '')
            warnings.warn(f'timm_arm: torch.compile could not build {self.fn.__name__} for the CPU path '
                          f'({type(error).__name__}: {textwrap.shorten(first_line, 240)}); it runs eagerly, slower '
                          f'(TIMM_ARM_COMPILE_CPU=0 skips the attempt)', RuntimeWarning, stacklevel=2)
            return self.fn(*args)
        self.succeeded = True
        return out


def _softplus_value(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), with log1p(t) = log(u) t / (u - 1), u = 1 + t (t where u rounds to
    1): exact to a few ulps with the vectorised log (ATen's log1p is not vectorised on CPUs)."""
    t = torch.exp(-x.abs())
    u = 1 + t
    return x.clamp_min(0) + torch.where(u == 1, t, torch.log(u) * t / (u - 1))


_SOFTPLUS = CompiledOnCpu(_softplus_value)


class _Softplus(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _SOFTPLUS(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``F.softplus(x)``, one fused pass on CPUs (its gradient: sigmoid)."""
    return _Softplus.apply(x) if _SOFTPLUS.active(x) else F.softplus(x)
