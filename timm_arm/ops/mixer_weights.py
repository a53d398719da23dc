""" The weights of a K-direction Mamba mixer as one value, what every backend of ``timm_arm.ops.mixer`` takes."""
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ['MixerWeights']


class MixerWeights(NamedTuple):
    """K scan directions of a Mamba-1 mixer with inner width d, N states and dt rank R.

    ``mixer_core`` reads the first seven (the conv, the x / dt projections and the scan's parameters); ``mixer``
    also the two projections around them (nn.Linear weights without biases).
    """
    conv_weight: torch.Tensor  # (K, d, W) depthwise causal conv
    conv_bias: torch.Tensor  # (K, d)
    x_proj_weight: torch.Tensor  # (K, R + 2N, d): [dt, B, C] from the conv's output
    dt_proj_weight: torch.Tensor  # (K, d, R)
    dt_proj_bias: torch.Tensor  # (K, d)
    A_log: torch.Tensor  # (K, d, N), A = -exp(A_log) as Mamba stores it
    D: torch.Tensor  # (K, d) skip
    in_proj_weight: Optional[torch.Tensor] = None  # (2d, dim): [x, z] per token
    out_proj_weight: Optional[torch.Tensor] = None  # (dim, d)

    @property
    def core(self) -> Tuple[torch.Tensor, ...]:
        """The seven weights of the mixer's core, in field order."""
        return tuple(self[:7])

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(K, d, N, R)."""
        K, d, N = self.A_log.shape
        return K, d, N, self.dt_proj_weight.shape[-1]
