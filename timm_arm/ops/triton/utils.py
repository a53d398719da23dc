""" Host-side helpers shared by the Triton kernel families: casts and layouts without needless calls (a no-op
``Tensor.to`` still costs microseconds of host time, and the mixer and MLP make dozens of them per layer)."""
from typing import Optional

import torch


def pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def cast(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """x in dtype; no call where it already is."""
    return x if x is None or x.dtype == dtype else x.to(dtype)


def dense(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return x if x is None or x.is_contiguous() else x.contiguous()


def channels_last(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """x with a contiguous last axis (what every kernel here reads), copied only where it is not."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes in on x: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
