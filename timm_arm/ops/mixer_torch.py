""" The core of a K-direction Mamba mixer in plain PyTorch, laid out for CPUs: direction-major (K, L, b, d).

Every tensor has the layout the next op reads: the input gathered once into each direction's scan order, the
causal conv as shifted multiply-adds along L, the x / dt projections as one batched matmul over the directions, the
scan (``SequentialScan``) on a cache-sized state, and one gather back to token order. No channel-first transposes,
no conv1d layout round trip, no per-scan layout copies.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .cpu_compile import softplus
from .mixer_weights import MixerWeights
from .selective_scan import SequentialScan

__all__ = ['mixer_core_torch']


def mixer_core_torch(
        xz: torch.Tensor,
        order: Optional[Tuple[torch.Tensor, torch.Tensor]],
        weights: MixerWeights,
) -> torch.Tensor:
    """``timm_arm.ops.mixer_core`` on the PyTorch path: same arguments, same result, (b, L, d)."""
    batch, seqlen, _ = xz.shape
    K, d, N, R = weights.shape
    conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D = weights.core
    width = conv_weight.shape[-1]
    x = xz[..., :d].transpose(0, 1)  # (L, b, d)
    x = x.unsqueeze(0).contiguous() if order is None else x[order[0].long()]  # (K, L, b, d), each in its order

    # causal depthwise conv along L (tap width - 1 on the current step), then SiLU
    w = conv_weight.to(x.dtype)[:, None, None]  # (K, 1, 1, d, width)
    u = torch.addcmul(conv_bias.to(x.dtype)[:, None, None], x, w[..., width - 1])
    for j in range(width - 1):
        shift = width - 1 - j
        u[:, shift:].addcmul_(x[:, :seqlen - shift], w[..., j])
    u = F.silu(u)

    x_dbl = torch.matmul(u.view(K, seqlen * batch, d), x_proj_weight.to(u.dtype).transpose(1, 2))  # (K, L b, R+2N)
    dt, B, C = x_dbl.split([R, N, N], dim=-1)
    delta = torch.baddbmm(dt_proj_bias.to(dt.dtype)[:, None], dt, dt_proj_weight.to(dt.dtype).transpose(1, 2))
    delta = softplus(delta.float()).view(K, seqlen, batch, d)
    u = u.float()
    y = SequentialScan.apply(u, delta, -torch.exp(A_log.float()), B.float().reshape(K, seqlen, batch, N),
                             C.float().reshape(K, seqlen, batch, N))  # (L, K, b, d)
    y = y + D.float()[:, None] * u.transpose(0, 1)
    if order is None:
        y = y[:, 0]
    else:  # back to token order: step inverse[k, p] of direction k read token p
        y = y[order[1].t().long(), torch.arange(K, device=y.device)].sum(1) / K
    return y.transpose(0, 1).to(xz.dtype) * F.silu(xz[..., d:])
