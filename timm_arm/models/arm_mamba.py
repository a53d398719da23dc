""" ARM: Autoregressive Pretraining with Mamba in Vision

Paper: `Autoregressive Pretraining with Mamba in Vision` - https://arxiv.org/abs/2406.07537 (ICLR 2025)
Reference code and weights: https://github.com/OliverRensu/ARM (Sucheng Ren et al.)

A plain, isotropic stack of Mamba blocks over 16x16 patches. One encoder class serves both uses:
    * classification: 4 scan directions (rows and columns, each forwards and backwards), a class token in
      the middle of the sequence, learned position embedding, mean of the patch tokens -> head;
    * autoregressive pretraining (timm_arm.models.arm_pretrain): 1 causal direction, no class token, fixed
      2-D sin-cos position embedding.

All directions of a layer run in ONE selective-scan call (directions stacked along channels, B/C grouped per
direction); the kernel choice (mamba-ssm / causal-conv1d CUDA kernels or plain PyTorch) is made in
timm_arm.ops, never here.

This implementation: the timm-arm authors (Apache-2.0).
"""
import logging
import math
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    GluMlp,
    PatchEmbed,
    build_sincos2d_pos_embed,
    register_notrace_function,
    register_notrace_module,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from timm_arm.ops import MixerWeights, add_layer_norm, mixer, mixer_core, swiglu_mlp

from ._weights import check_pretrained_source

# they dispatch on the tensors' device: leaf calls for FX
register_notrace_function(swiglu_mlp)
register_notrace_function(add_layer_norm)

__all__ = ['ArmMamba', 'MultiDirectionMamba', 'ArmBlock', 'scan_orders', 'resample_pos_embed', 'HUB_ORG',
           'HUB_REVISIONS', 'ENCODER_FORM']

_logger = logging.getLogger(__name__)

HUB_ORG = 'timm-arm'  # Hugging Face organisation that holds the published weights

# ArmMamba kwargs of the AR-pretraining form of the encoder (as ArmPretrainer builds it): with them, create_model
# builds the encoder itself, without them the 4-direction classifier of the same shape
ENCODER_FORM = dict(num_directions=1, class_token=False, pos_embed='sincos')

# Hub commit of each published tag's upload (`timm-arm-hub publish` prints it): a tag loads exactly those files,
# whatever is pushed to its repo later. No tag is published yet.
HUB_REVISIONS: Dict[str, str] = {}


def _hub_id(name: str) -> str:
    """hf_hub_id of a tag: '<HUB_ORG>/<name>', pinned to its published revision ('...@<sha>') once there is one."""
    revision = HUB_REVISIONS.get(name)
    return f'{HUB_ORG}/{name}' + (f'@{revision}' if revision else '')


@lru_cache(maxsize=64)
def scan_orders(
        grid_size: Tuple[int, int],
        num_directions: int,
        cls_index: Optional[int],
        device: torch.device,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Token order of each scan direction, and its inverse, as (K, L) int32 index tensors, the kernels' index type
    (None for 1 direction).

    Directions: row-major forward, row-major backward, column-major forward, column-major backward.
    The column order transposes the patch grid while the class token keeps its index; backward orders flip the
    whole sequence. order[k, i] is the token read at step i of direction k; inverse[k, p] the step that reads p.
    """
    if num_directions == 1:
        return None
    if num_directions not in (2, 4):
        raise ValueError(f'num_directions must be 1, 2 or 4, got {num_directions}')
    with torch.inference_mode(False):  # cached across calls: none of it may be an inference tensor
        H, W = grid_size
        column_major = torch.arange(H * W).view(H, W).t().flatten()
        row_major = torch.arange(H * W)

        def with_cls(patch_order):
            if cls_index is None:
                return patch_order
            token = patch_order + (patch_order >= cls_index).long()
            return torch.cat([token[:cls_index], token.new_tensor([cls_index]), token[cls_index:]])

        rows, cols = with_cls(row_major), with_cls(column_major)
        order = torch.stack([rows, rows.flip(0), cols, cols.flip(0)][:num_directions])
        return order.to(device, torch.int32), order.argsort(dim=1).to(device, torch.int32)


def resample_pos_embed(
        pos_embed: torch.Tensor,
        new_size: Tuple[int, int],
        old_size: Optional[Tuple[int, int]] = None,
        interpolation: str = 'bicubic',
        antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, N [+1], C) position embedding whose class position, if any, sits in the middle (N // 2).

    A class position stays in the middle of the new grid. ``old_size`` defaults to a square grid.
    """
    num_pos = pos_embed.shape[1]
    if old_size is None:
        side = int(math.isqrt(num_pos))
        old_size = (side, side)
    num_old = old_size[0] * old_size[1]
    has_cls = num_pos == num_old + 1
    if not has_cls and num_pos != num_old:
        raise ValueError(f'pos_embed of {num_pos} positions does not fit a {old_size} grid (with or without class)')
    if has_cls:
        pos_embed, cls_pos = remove_middle_token(pos_embed)
    if tuple(new_size) != tuple(old_size):
        pos_embed = resample_abs_pos_embed(
            pos_embed, list(new_size), list(old_size), num_prefix_tokens=0,
            interpolation=interpolation, antialias=antialias)
    return insert_middle_token(pos_embed, cls_pos) if has_cls else pos_embed


@register_notrace_function
def insert_middle_token(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """(B, N, C) patch tokens (or position embeddings) -> (B, N + 1, C) with `token` (broadcast over B) at index
    N // 2, where ARM keeps its class token."""
    mid = x.shape[1] // 2
    return torch.cat([x[:, :mid], token.expand(x.shape[0], -1, -1), x[:, mid:]], dim=1)


@register_notrace_function
def remove_middle_token(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of insert_middle_token: (B, N + 1, C) -> ((B, N, C) without index N // 2, that token (B, 1, C))."""
    mid = (x.shape[1] - 1) // 2
    return torch.cat([x[:, :mid], x[:, mid + 1:]], dim=1), x[:, mid:mid + 1]


@register_notrace_function
def tokens_to_grid(x: torch.Tensor, height: int, width: int, has_cls: bool) -> torch.Tensor:
    """(B, L, C) token sequence -> (B, H, W, C) patch grid, the middle class token (if any) dropped."""
    if has_cls:
        x = remove_middle_token(x)[0]
    return x.reshape(x.shape[0], height, width, x.shape[-1])


@register_notrace_function
def orders_for(x: torch.Tensor, height: int, width: int, num_directions: int, has_cls: bool):
    """scan_orders() for an (H, W) patch grid, on x's device."""
    cls_index = height * width // 2 if has_cls else None
    return scan_orders((int(height), int(width)), num_directions, cls_index, x.device)


def _plain_linear(module: nn.Module, bias: bool = False) -> bool:
    """Whether ``module`` is a bias-free (or any, with bias=True) nn.Linear without hooks, which a fused op may
    compute from its weight instead of calling it (a LoRA wrapper, a quantised Linear or a hook keeps the call)."""
    return (type(module) is nn.Linear and (bias or module.bias is None)
            and not (module._forward_hooks or module._forward_pre_hooks))


@register_notrace_module
class MultiDirectionMamba(nn.Module):
    """Mamba-1 mixer over K scan directions sharing in_proj / out_proj.

    Each direction has its own depthwise conv, x_proj, dt_proj, A and D, stacked along a leading K axis so
    that the conv, the projections and the selective scan each run once for all directions. Each direction's
    output is gated by SiLU(z) of the same token; since gating is per token, gating the sum of the directions
    (mapped back to token order) once is the same, and cheaper.
    """

    def __init__(
            self,
            dim: int,
            num_directions: int = 4,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 1,
            dt_rank: Optional[int] = None,
            dt_min: float = 1e-3,
            dt_max: float = 1e-1,
            dt_init_floor: float = 1e-4,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_directions = K = num_directions
        self.d_inner = d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = dt_rank = dt_rank or math.ceil(dim / 16)
        self.dt_range = (dt_min, dt_max, dt_init_floor)

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False, **dd)
        self.conv_weight = nn.Parameter(torch.empty(K, d_inner, d_conv, **dd))
        self.conv_bias = nn.Parameter(torch.empty(K, d_inner, **dd))
        self.x_proj_weight = nn.Parameter(torch.empty(K, dt_rank + 2 * d_state, d_inner, **dd))
        self.dt_proj_weight = nn.Parameter(torch.empty(K, d_inner, dt_rank, **dd))
        self.dt_proj_bias = nn.Parameter(torch.empty(K, d_inner, **dd))
        self.A_log = nn.Parameter(torch.empty(K, d_inner, d_state, **dd))
        self.D = nn.Parameter(torch.empty(K, d_inner, **dd))
        self.out_proj = nn.Linear(d_inner, dim, bias=False, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, D = 1, dt bias = softplus^-1 of log-uniform dt in [dt_min, dt_max]."""
        dt_min, dt_max, dt_init_floor = self.dt_range
        conv_bound = 1 / math.sqrt(self.conv_weight.shape[-1])  # nn.Conv1d's default for a depthwise conv
        self.conv_weight.uniform_(-conv_bound, conv_bound)
        self.conv_bias.uniform_(-conv_bound, conv_bound)
        trunc_normal_(self.x_proj_weight, std=.02)
        dt_bound = self.dt_rank ** -0.5
        self.dt_proj_weight.uniform_(-dt_bound, dt_bound)
        dt = torch.exp(torch.rand_like(self.dt_proj_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand_as(self.A_log))
        self.D.fill_(1.)

    def forward(self, x: torch.Tensor, order: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x: (B, L, dim) in token order; order: (scan order, inverse) from scan_orders(), None for 1 direction."""
        if _plain_linear(self.in_proj) and _plain_linear(self.out_proj):  # the whole mixer as one op
            return mixer(x, order, self.weights(with_projections=True))
        return self.out_proj(mixer_core(self.in_proj(x), order, self.weights()))  # projections wrapped or hooked

    def weights(self, with_projections: bool = False) -> MixerWeights:
        """This mixer's parameters as the ops take them (the in / out projections' weights where asked for)."""
        projections = (self.in_proj.weight, self.out_proj.weight) if with_projections else ()
        return MixerWeights(self.conv_weight, self.conv_bias, self.x_proj_weight, self.dt_proj_weight,
                            self.dt_proj_bias, self.A_log, self.D, *projections)


class AlignedGluMlp(GluMlp):
    """timm's GluMlp, same parameters and results, computed the fast way on GPUs (``timm_arm.ops.swiglu_mlp``).

    - fc1 stays one GEMM and silu(gate) * value is one fused kernel that reads the GEMM output's two halves in
      place and writes their gradients back as one tensor (timm's version runs SiLU and the product as strided,
      unvectorised kernels on the halves, and autograd keeps silu(gate) as a third activation); where the Triton
      kernels run, fc1, the product and fc2 are one autograd node;
    - the hidden width is zero-padded to a multiple of 8 for the GEMMs: ARM's SwiGLU width dim * 4 * 2 // 3 is 2730
      for ARM-L, and rows of 2730 bf16 values are not 16-byte aligned, which sends cuBLAS to slow GEMM kernels.
    Any other configuration (activation, norm, dropout in training, wrapped Linears) runs timm's forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.chunk_dim != -1 or not isinstance(self.norm, nn.Identity) or type(self.act) is not nn.SiLU
                or not (_plain_linear(self.fc1, bias=True) and _plain_linear(self.fc2, bias=True))
                or (self.training and (self.drop1.p > 0 or self.drop2.p > 0))):
            return super().forward(x)
        return swiglu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.gate_last)


class ArmBlock(nn.Module):
    """x = x + DropPath(Mixer(LN(x))); x = x + DropPath(SwiGLU(LN(x)))."""

    def __init__(
            self,
            dim: int,
            num_directions: int = 4,
            mlp_ratio: float = 4.,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 1,
            dt_rank: Optional[int] = None,
            drop_path: float = 0.,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mixer = MultiDirectionMamba(
            dim, num_directions, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        # SwiGLU with the gate (w1) and value (w2) projections packed into one fc1: [gate; value]
        hidden = int(dim * mlp_ratio * 2 / 3)
        self.mlp = AlignedGluMlp(dim, 2 * hidden, act_layer=nn.SiLU, gate_last=False, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, order: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        # norm1, and the first residual add with norm2, as single ops (one Triton kernel each at inference on GPU)
        _, h = add_layer_norm(x, None, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        branch = self.drop_path1(self.mixer(h, order))
        x, h = add_layer_norm(x, branch, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return x + self.drop_path2(self.mlp(h))


class ArmMamba(nn.Module):
    """ARM Mamba encoder and classifier.

    forward_features() returns the normalised patch tokens as an NHWC grid (the class token, which sits in the
    middle of the sequence, is dropped); the head pools them by mean, as in the paper.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 768,
            depth: int = 12,
            mlp_ratio: float = 4.,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 1,
            dt_rank: Optional[int] = None,
            num_directions: int = 4,
            class_token: bool = True,
            pos_embed: str = 'learn',
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ):
        """
        Args:
            num_directions: Scan directions per layer: 4 for classification, 1 (causal) for AR pretraining.
            class_token: Insert a class token in the middle of the patch sequence.
            pos_embed: 'learn' (learned, trained) or 'sincos' (fixed 2-D sin-cos, frozen).
            dynamic_img_size: Accept any image size, resampling the position embedding on the fly.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if global_pool not in ('', 'avg', 'max', 'avgmax'):
            raise ValueError(f'global_pool must be one of "", "avg", "max", "avgmax"; got {global_pool!r}')
        if pos_embed not in ('learn', 'sincos'):
            raise ValueError(f'pos_embed must be "learn" or "sincos", got {pos_embed!r}')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_directions = num_directions
        self.num_prefix_tokens = 1 if class_token else 0
        self.dynamic_img_size = dynamic_img_size
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt='NHWC',
            strict_img_size=not dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim, **dd), requires_grad=pos_embed == 'learn')
        self.pos_embed_type = pos_embed
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            ArmBlock(
                embed_dim,
                num_directions,
                mlp_ratio=mlp_ratio,
                d_state=d_state,
                d_conv=d_conv,
                expand=expand,
                dt_rank=dt_rank,
                drop_path=dpr[i],
                norm_eps=norm_eps,
                **dd,
            )
            for i in range(depth)])
        r = self.patch_embed.feat_ratio() if hasattr(self.patch_embed, 'feat_ratio') else patch_size
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=r) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, **dd)
        self.head = ClassifierHead(
            embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt='NHWC', **dd)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            block.mixer.reset_parameters()
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.pos_embed_type == 'sincos':
            self.pos_embed.copy_(self._sincos_pos_embed(self.patch_embed.grid_size))
        else:
            trunc_normal_(self.pos_embed, std=.02)

    def _sincos_pos_embed(self, grid_size: Tuple[int, int]) -> torch.Tensor:
        """Fixed 2-D sin-cos embedding (MAE's frequencies), a zero class position in the middle if any."""
        pos = build_sincos2d_pos_embed(
            list(grid_size), self.embed_dim, device=self.pos_embed.device, dtype=self.pos_embed.dtype).unsqueeze(0)
        return insert_middle_token(pos, torch.zeros_like(pos[:, :1])) if self.num_prefix_tokens else pos

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {
            'pos_embed', 'cls_token', 'blocks.*.mixer.A_log', 'blocks.*.mixer.D',
            'blocks.*.mixer.dt_proj_bias', 'blocks.*.mixer.conv_bias',
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # the final norm is left unmatched: it joins the head's group (layer decay scale 1.0), as in the paper
        return dict(
            stem=r'^cls_token|^pos_embed|^patch_embed',
            blocks=r'^blocks\.(\d+)',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        anchor = self.patch_embed.proj.weight  # the new head follows the model's device and dtype
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool, device=anchor.device, dtype=anchor.dtype)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Change the default image size, resampling the position embedding (class position stays centred)."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != old_grid:
            requires_grad = self.pos_embed.requires_grad
            with torch.no_grad():
                if self.pos_embed_type == 'sincos':
                    new = self._sincos_pos_embed(new_grid)
                else:
                    new = resample_pos_embed(self.pos_embed, new_grid, old_grid)
            self.pos_embed = nn.Parameter(new, requires_grad=requires_grad)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Images -> token sequence (class token in the middle) with position embedding; also the patch grid."""
        x = self.patch_embed(x)
        B, H, W, C = x.shape
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            pos_embed = self._dynamic_pos_embed(H, W)
        x = x.reshape(B, H * W, C)
        if self.cls_token is not None:
            x = insert_middle_token(x, self.cls_token)
        x = self.pos_drop(x + pos_embed)
        return x, H, W

    @torch.jit.ignore
    def _dynamic_pos_embed(self, height: int, width: int) -> torch.Tensor:
        if (height, width) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        if self.pos_embed_type == 'sincos':
            return self._sincos_pos_embed((height, width))
        return resample_pos_embed(self.pos_embed, (height, width), self.patch_embed.grid_size)

    def _run_block(self, block: nn.Module, x: torch.Tensor, order) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x, order)
        return block(x, order)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, H, W = self._embed(x)
        order = orders_for(x, H, W, self.num_directions, self.cls_token is not None)
        for block in self.blocks:
            x = self._run_block(block, x, order)
        return self.norm(tokens_to_grid(x, H, W, self.cls_token is not None))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the outputs of the blocks in ``indices`` (patch grids, class token apart).

        Args:
            indices: Take the last n blocks if int, all if None, those listed if a sequence.
            return_prefix_tokens: Return (grid, class token) pairs.
            norm: Apply the final norm to the intermediates.
            stop_early: Stop after the last block needed.
            output_fmt: 'NCHW', 'NHWC' or 'NLC' (patch tokens in row-major order).
            intermediates_only: Return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC', 'NLC'):
            raise ValueError(f'output_fmt must be NCHW, NHWC or NLC, got {output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, H, W = self._embed(x)
        has_cls = self.cls_token is not None
        order = orders_for(x, H, W, self.num_directions, has_cls)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x, order)
            if i in take_indices:
                feat = tokens_to_grid(x, H, W, has_cls)
                cls = remove_middle_token(x)[1][:, 0] if has_cls else None
                feat = self.norm(feat) if norm else feat
                if output_fmt == 'NCHW':
                    feat = feat.permute(0, 3, 1, 2).contiguous()
                elif output_fmt == 'NLC':
                    feat = feat.flatten(1, 2)
                intermediates.append((feat, cls) if return_prefix_tokens and cls is not None else feat)
        if intermediates_only:
            return intermediates
        return self.norm(tokens_to_grid(x, H, W, has_cls)), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


_DIRECTION_SUFFIXES = ('', '_b', '_c', '_c_b')  # reference code: row fwd, row bwd, column fwd, column bwd
_STACKED = ('conv_weight', 'conv_bias', 'x_proj_weight', 'dt_proj_weight', 'dt_proj_bias', 'A_log', 'D')


def _convert_reference(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Reference-code layout (layers.{i}.mixer.x_proj_b.weight, A_c_log, mlp.w1, norm_f, ...) -> ours."""
    out = {}
    depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('layers.'))
    for i in range(depth):
        src, dst = f'layers.{i}.', f'blocks.{i}.'
        mixer = src + 'mixer.'
        suffixes = [s for s in _DIRECTION_SUFFIXES if mixer + f'x_proj{s}.weight' in state_dict]
        sources = {
            'conv_weight': [f'conv1d{s}.weight' for s in suffixes],
            'conv_bias': [f'conv1d{s}.bias' for s in suffixes],
            'x_proj_weight': [f'x_proj{s}.weight' for s in suffixes],
            'dt_proj_weight': [f'dt_proj{s}.weight' for s in suffixes],
            'dt_proj_bias': [f'dt_proj{s}.bias' for s in suffixes],
            'A_log': [f'A{s}_log' for s in suffixes],
            'D': [f'D{s}' for s in suffixes],
        }
        for name, keys in sources.items():
            tensors = [state_dict[mixer + k] for k in keys]
            out[dst + 'mixer.' + name] = torch.stack([t.squeeze(1) if name == 'conv_weight' else t for t in tensors])
        for name in ('in_proj.weight', 'out_proj.weight'):
            out[dst + 'mixer.' + name] = state_dict[mixer + name]
        for norm in ('norm1', 'norm2'):
            for p in ('weight', 'bias'):
                out[f'{dst}{norm}.{p}'] = state_dict[f'{src}{norm}.{p}']
        for p in ('weight', 'bias'):
            out[f'{dst}mlp.fc1.{p}'] = torch.cat([state_dict[f'{src}mlp.w1.{p}'], state_dict[f'{src}mlp.w2.{p}']])
            out[f'{dst}mlp.fc2.{p}'] = state_dict[f'{src}mlp.w3.{p}']
    renames = {'norm_f.': 'norm.', 'head.': 'head.fc.', 'patch_embed.': 'patch_embed.'}
    for k, v in state_dict.items():
        if k in ('pos_embed', 'cls_token'):
            out[k] = v
        for old, new in renames.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: ArmMamba) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: reference-code fine-tuning or pretraining layouts, our AR pretrainer's
    encoder, or our own layout. One-direction (pretraining) SSM weights are copied into every direction, the
    position embedding is resampled to the model's grid (a class position inserted, zero, in the middle), the
    decoder is dropped, and a missing head / class token keeps the model's fresh init. Anything else that does
    not fit raises an error listing the keys.
    """
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    if any(k.startswith('encoder.') for k in state_dict):  # our AR pretrainer
        state_dict = {k[len('encoder.'):]: v for k, v in state_dict.items() if k.startswith('encoder.')}
    if any(k.startswith('layers.') for k in state_dict):  # reference code
        state_dict = _convert_reference(state_dict)

    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        name = k.rsplit('.', 1)[-1]
        if k.startswith('blocks.') and name in _STACKED and k in target:
            K = target[k].shape[0]
            if v.shape[0] == 1 and K > 1:
                v = v.expand(K, *v.shape[1:]).clone()  # one pretraining direction -> every direction
        elif k == 'pos_embed' and v.shape != target[k].shape:
            grid = model.patch_embed.grid_size
            side = int(math.isqrt(v.shape[1]))
            has_cls = v.shape[1] == side * side + 1
            if not has_cls and v.shape[1] != side * side:
                raise RuntimeError(f'pos_embed of shape {tuple(v.shape)} is not a square grid of positions')
            v = resample_pos_embed(v.float(), grid, (side, side)).to(v.dtype)
            if model.cls_token is not None and not has_cls:
                v = insert_middle_token(v, torch.zeros_like(v[:, :1]))
            elif model.cls_token is None and has_cls:
                v = remove_middle_token(v)[0]
        out[k] = v

    # encoder-only checkpoints (AR pretraining): the head and class token start fresh, as in the paper
    fresh = [k for k in target if k not in out and (k.startswith('head.') or k == 'cls_token')]
    if fresh and any(k.startswith('blocks.') for k in out):
        _logger.info(f'Checkpoint has no {", ".join(fresh)}: keeping their fresh initialisation.')
        out.update({k: target[k] for k in fresh})

    missing = [k for k in target if k not in out]
    unexpected = [k for k in out if k not in target]
    def adapted_by_timm(k: str) -> bool:  # timm adapts the classifier and the input channels after this filter
        if k.startswith('head.'):
            return True
        return k == 'patch_embed.proj.weight' and out[k].shape[0] == target[k].shape[0] \
            and out[k].shape[2:] == target[k].shape[2:]

    mismatched = [
        f'{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(target[k].shape)}' for k in out
        if k in target and out[k].shape != target[k].shape and not adapted_by_timm(k)]
    if missing or unexpected or mismatched:
        lines = []
        for title, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
            if keys:
                lines.append(f'{title} ({len(keys)}): ' + ', '.join(keys[:12]) + (' ...' if len(keys) > 12 else ''))
        raise RuntimeError(
            f'Checkpoint does not fit {type(model).__name__} (embed_dim={model.embed_dim}, '
            f'depth={len(model.blocks)}, num_directions={model.num_directions}):\n  ' + '\n  '.join(lines))
    return out


def _create_arm_mamba(variant: str, pretrained: bool = False, **kwargs) -> ArmMamba:
    if pretrained:
        check_pretrained_source(variant, kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        ArmMamba,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (14, 14),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2406.07537',
        'paper_name': 'Autoregressive Pretraining with Mamba in Vision',
        'origin_url': 'https://github.com/OliverRensu/ARM',
        **kwargs,
    }


def _ar_cfg(**kwargs) -> Dict[str, Any]:
    """AR-pretrained encoder (192 px, no head): load it into the classifier for fine-tuning."""
    return _cfg(num_classes=0, input_size=(3, 192, 192), pool_size=(12, 12), crop_pct=1.0, **kwargs)


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    """CIFAR-10 at its native 32 px (no resize, no crop)."""
    return _cfg(**{'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0, **kwargs})


default_cfgs = generate_default_cfgs({
    'arm_mamba_tiny.untrained': _cfg(),
    'arm_mamba_small.untrained': _cfg(),
    'arm_mamba_tiny_patch4_32.arm_cifar10': _cifar_cfg(hf_hub_id=_hub_id('arm_mamba_tiny_patch4_32.arm_cifar10')),
    'arm_mamba_tiny_patch4_32.arm_cifar10_ar': _cifar_cfg(
        hf_hub_id=_hub_id('arm_mamba_tiny_patch4_32.arm_cifar10_ar'), num_classes=0),
    'arm_mamba_base.arm_in1k': _cfg(hf_hub_id=_hub_id('arm_mamba_base.arm_in1k')),
    'arm_mamba_base.arm_in1k_ar': _ar_cfg(hf_hub_id=_hub_id('arm_mamba_base.arm_in1k_ar')),
    'arm_mamba_large.arm_in1k': _cfg(hf_hub_id=_hub_id('arm_mamba_large.arm_in1k')),
    'arm_mamba_large.arm_in1k_ar': _ar_cfg(hf_hub_id=_hub_id('arm_mamba_large.arm_in1k_ar')),
    'arm_mamba_huge.arm_in1k': _cfg(hf_hub_id=_hub_id('arm_mamba_huge.arm_in1k')),
    'arm_mamba_huge.arm_in1k_384': _cfg(
        hf_hub_id=_hub_id('arm_mamba_huge.arm_in1k_384'), input_size=(3, 384, 384), pool_size=(24, 24),
        crop_pct=1.0),
    'arm_mamba_huge.arm_in1k_ar': _ar_cfg(hf_hub_id=_hub_id('arm_mamba_huge.arm_in1k_ar')),
})


@register_model
def arm_mamba_tiny(pretrained: bool = False, **kwargs) -> ArmMamba:
    """ARM-Ti: 192 x 12 (ViT-Ti's shape), 5.4 M parameters at 224."""
    model_args = dict(embed_dim=192, depth=12)
    return _create_arm_mamba('arm_mamba_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def arm_mamba_small(pretrained: bool = False, **kwargs) -> ArmMamba:
    """ARM-S: 384 x 12 (ViT-S's shape), 21 M parameters at 224."""
    model_args = dict(embed_dim=384, depth=12)
    return _create_arm_mamba('arm_mamba_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def arm_mamba_tiny_patch4_32(pretrained: bool = False, **kwargs) -> ArmMamba:
    """ARM-Ti for 32 px images (CIFAR): 4 x 4 patches, an 8 x 8 grid."""
    model_args = dict(embed_dim=192, depth=12, patch_size=4, img_size=32)
    return _create_arm_mamba('arm_mamba_tiny_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def arm_mamba_base(pretrained: bool = False, **kwargs) -> ArmMamba:
    """ARM-B: 768 x 12, 85 M parameters, 83.2 % IN-1k top-1 at 224."""
    model_args = dict(embed_dim=768, depth=12)
    return _create_arm_mamba('arm_mamba_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def arm_mamba_large(pretrained: bool = False, **kwargs) -> ArmMamba:
    """ARM-L: 1024 x 24, 297 M parameters, 84.5 % IN-1k top-1 at 224."""
    model_args = dict(embed_dim=1024, depth=24)
    return _create_arm_mamba('arm_mamba_large', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def arm_mamba_huge(pretrained: bool = False, **kwargs) -> ArmMamba:
    """ARM-H: 1536 x 24, 663 M parameters, 85.0 % IN-1k top-1 at 224 (85.5 % at 384)."""
    model_args = dict(embed_dim=1536, depth=24)
    return _create_arm_mamba('arm_mamba_huge', pretrained=pretrained, **dict(model_args, **kwargs))
