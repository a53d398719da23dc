""" Depthwise causal conv1d followed by SiLU: plain PyTorch, and causal-conv1d's CUDA kernel. """
import torch
import torch.nn.functional as F

__all__ = ['causal_conv1d_silu_torch', 'causal_conv1d_silu_cuda']


def causal_conv1d_silu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: (b, D, L), weight: (D, width), bias: (D,) -> silu(causal depthwise conv), (b, D, L)."""
    width = weight.shape[-1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out)


def causal_conv1d_silu_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from causal_conv1d import causal_conv1d_fn
    return causal_conv1d_fn(x, weight, bias, activation='silu')
