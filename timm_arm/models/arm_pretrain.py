""" ARM autoregressive pretrainer

Paper: `Autoregressive Pretraining with Mamba in Vision` - https://arxiv.org/abs/2406.07537 (ICLR 2025)
Reference code: https://github.com/OliverRensu/ARM (Sucheng Ren et al.)

The image is cut into patches, the patches are grouped into clusters of `cluster_size` patches (4 x 4 in the
paper) and the tokens are ordered cluster by cluster (row-major over clusters, row-major inside a cluster).
The causal (one-direction) ArmMamba encoder reads every cluster but the last; a light cross-attention decoder
predicts each cluster j >= 1 from the encoder tokens of clusters 0 .. j-1 (block-causal mask):

    patches -> cluster order -> encoder (clusters 0..K-2) -> taps of n layers -> LN -> one Linear -> n chunks
    queries = learned token + sin-cos position of the target patches (clusters 1..K-1)
    n x [ q = q + CrossAttn(LN(q), LN(chunk_k), block-causal mask);  q = q + Mlp(LN(q)) ] -> LN -> Linear
    loss = MSE against per-patch normalised pixels of clusters 1..K-1

Image size, cluster size, decoder width / depth and tapped layers are arguments (the reference fixes 192 px,
3 x 3 clusters and 4 taps). The encoder is the same ArmMamba class the classifier uses, so its state dict
(`encoder.*`) loads into the 4-direction classifier through arm_mamba.checkpoint_filter_fn.

This implementation: the timm-arm authors (Apache-2.0).
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import Mlp, build_sincos2d_pos_embed, to_2tuple, trunc_normal_
from timm.models._manipulate import checkpoint

from .arm_mamba import ArmMamba

__all__ = ['ArmPretrainer', 'CrossAttentionBlock', 'cluster_order', 'block_causal_mask', 'default_tap_layers',
           'create_pretrainer', 'encoder_kwargs']


def cluster_order(grid_size: Tuple[int, int], cluster_size: Tuple[int, int]) -> torch.Tensor:
    """Row-major patch indices listed cluster by cluster, shape (num_clusters, patches_per_cluster).

    Clusters are visited row-major over the cluster grid; patches row-major inside a cluster. E.g. a 4 x 4 grid
    with 2 x 2 clusters: [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]].
    """
    (H, W), (ch, cw) = grid_size, cluster_size
    if H % ch or W % cw:
        raise ValueError(f'Patch grid {H}x{W} is not divisible into clusters of {ch}x{cw} patches.')
    idx = torch.arange(H * W).view(H // ch, ch, W // cw, cw)
    return idx.permute(0, 2, 1, 3).reshape((H // ch) * (W // cw), ch * cw)


def block_causal_mask(num_clusters: int, cluster_len: int) -> torch.Tensor:
    """Boolean (Q, Kv) mask, True = may attend, for predicting clusters 1..K-1 from encoder clusters 0..K-2.

    Query block i predicts cluster i + 1 and sees encoder clusters 0..i: everything strictly before its target.
    """
    allowed = torch.ones(num_clusters - 1, num_clusters - 1, dtype=torch.bool).tril()
    return allowed.repeat_interleave(cluster_len, 0).repeat_interleave(cluster_len, 1)


def default_tap_layers(depth: int, num_taps: int = 4) -> Tuple[int, ...]:
    """1-based encoder layers to tap: evenly from depth/2 to depth (12 -> 6, 8, 10, 12; 24 -> 12, 16, 20, 24)."""
    if num_taps == 1:
        return (depth,)
    fractions = [0.5 + 0.5 * k / (num_taps - 1) for k in range(num_taps)]
    return tuple(max(1, int(math.floor(depth * f + 0.5))) for f in fractions)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a separate key / value sequence."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).view(B, N, h, C // h).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttentionBlock(nn.Module):
    """q = q + CrossAttn(LN(q), LN(context)); q = q + Mlp(LN(q)). No self-attention among the queries."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.norm_kv = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, **dd)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context), attn_mask)
        x = x + self.mlp(self.norm2(x))
        return x


class ArmPretrainer(nn.Module):
    """ARM autoregressive pretraining model: causal ArmMamba encoder + cross-attention cluster decoder.

    forward(images) returns the scalar loss; forward_pred(images) the predictions and their targets.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 192,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            depth: int = 12,
            cluster_size: Union[int, Tuple[int, int]] = 4,
            tap_layers: Optional[Sequence[int]] = None,
            decoder_embed_dim: int = 512,
            decoder_depth: int = 4,
            decoder_num_heads: int = 8,
            decoder_mlp_ratio: float = 4.,
            norm_pix_eps: float = 1e-6,
            encoder_args: Optional[Dict[str, Any]] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            cluster_size: Patches per cluster (rows, cols); the patch grid must divide into clusters.
            tap_layers: 1-based encoder layers whose outputs feed the decoder, one per decoder block
                (default: evenly from depth/2 to depth, see default_tap_layers()).
            decoder_depth: Number of decoder blocks (= number of taps when tap_layers is not given).
            norm_pix_eps: Epsilon of the per-patch pixel normalisation of the targets.
            encoder_args: Further ArmMamba arguments (mlp_ratio, d_state, drop_path_rate, ...).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        img_size, patch_size, cluster_size = to_2tuple(img_size), to_2tuple(patch_size), to_2tuple(cluster_size)
        step = (patch_size[0] * cluster_size[0], patch_size[1] * cluster_size[1])
        if img_size[0] % step[0] or img_size[1] % step[1]:
            raise ValueError(
                f'Image size {img_size[0]}x{img_size[1]} must be divisible by patch size x cluster size '
                f'({patch_size[0]}x{cluster_size[0]}, {patch_size[1]}x{cluster_size[1]}) = {step[0]}x{step[1]}.')
        tap_layers = tuple(tap_layers) if tap_layers is not None else default_tap_layers(depth, decoder_depth)
        if len(tap_layers) != decoder_depth:
            raise ValueError(f'tap_layers {tap_layers} must list one layer per decoder block ({decoder_depth}).')
        if not all(1 <= t <= depth for t in tap_layers):
            raise ValueError(f'tap_layers {tap_layers} must lie in 1..depth ({depth}).')
        self.img_size, self.patch_size, self.cluster_size = img_size, patch_size, cluster_size
        self.in_chans = in_chans
        self.tap_layers = tap_layers
        self.norm_pix_eps = norm_pix_eps

        self.encoder = ArmMamba(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_directions=1, class_token=False, pos_embed='sincos', num_classes=0, global_pool='',
            **(encoder_args or {}), **dd)
        # The encoder's final norm is not used here (each tap has its own LN). Frozen, it stays at its fresh init
        # and the fine-tuned classifier starts with an identity final norm, as in the paper.
        self.encoder.norm.requires_grad_(False)

        grid = self.encoder.patch_embed.grid_size
        order = cluster_order(grid, cluster_size)
        self.num_clusters, self.cluster_len = order.shape
        if self.num_clusters < 2:
            raise ValueError(f'A {grid[0]}x{grid[1]} patch grid holds a single {cluster_size} cluster: nothing '
                             f'to predict. Use a larger image or smaller clusters.')
        self.register_buffer('order', order.flatten(), persistent=False)
        self.register_buffer('attn_mask', block_causal_mask(self.num_clusters, self.cluster_len), persistent=False)

        n = len(tap_layers)
        self.tap_norms = nn.ModuleList([nn.LayerNorm(embed_dim, **dd) for _ in range(n)])
        self.enc2dec = nn.Linear(n * embed_dim, n * decoder_embed_dim, **dd)
        self.query_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim, **dd))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, grid[0] * grid[1], decoder_embed_dim, **dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            CrossAttentionBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio=decoder_mlp_ratio, **dd)
            for _ in range(n)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, **dd)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size[0] * patch_size[1] * in_chans, **dd)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Decoder: xavier-uniform Linears, zero biases, fixed sin-cos positions. The encoder inits itself."""
        for module in [self.enc2dec, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        trunc_normal_(self.query_token, std=.02)
        pos = build_sincos2d_pos_embed(
            list(self.encoder.patch_embed.grid_size), self.decoder_pos_embed.shape[-1],
            device=self.decoder_pos_embed.device, dtype=self.decoder_pos_embed.dtype)
        self.decoder_pos_embed.copy_(pos.unsqueeze(0))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'encoder.' + k for k in self.encoder.no_weight_decay()} | {'query_token', 'decoder_pos_embed'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_patches, ph * pw * C), patches row-major, values ordered (ph, pw, C)."""
        B, C, H, W = images.shape
        ph, pw = self.patch_size
        x = images.reshape(B, C, H // ph, ph, W // pw, pw)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // ph) * (W // pw), ph * pw * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of patchify()."""
        B = x.shape[0]
        (ph, pw), (gh, gw) = self.patch_size, self.encoder.patch_embed.grid_size
        x = x.reshape(B, gh, gw, ph, pw, self.in_chans)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, self.in_chans, gh * ph, gw * pw)

    def forward_encoder(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Encoder over clusters 0..K-2 in cluster order; returns the normed outputs of the tapped layers."""
        x = self.encoder.patch_embed(images).flatten(1, 2) + self.encoder.pos_embed
        x = x[:, self.order[:-self.cluster_len]]
        outs: List[Optional[torch.Tensor]] = [None] * len(self.tap_layers)
        for i, block in enumerate(self.encoder.blocks[:max(self.tap_layers)]):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, None)
            else:
                x = block(x, None)
            for k, t in enumerate(self.tap_layers):
                if t - 1 == i:
                    outs[k] = self.tap_norms[k](x)
        return outs

    def forward_decoder(self, features: List[torch.Tensor]) -> torch.Tensor:
        """Tapped features -> predicted pixels of clusters 1..K-1, (B, (K-1) * cluster_len, ph * pw * C)."""
        context = self.enc2dec(torch.cat(features, dim=-1)).chunk(len(self.decoder_blocks), dim=-1)
        B = features[0].shape[0]
        pos = self.decoder_pos_embed[:, self.order[self.cluster_len:]]
        x = (self.query_token + pos).expand(B, -1, -1).to(context[0].dtype)
        for block, ctx in zip(self.decoder_blocks, context):
            x = block(x, ctx, self.attn_mask)
        return self.decoder_pred(self.decoder_norm(x))

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch normalised pixels of clusters 1..K-1 in cluster order (unbiased variance, as the paper)."""
        t = self.patchify(images.float())[:, self.order[self.cluster_len:]]
        mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
        return (t - mean) / (var + self.norm_pix_eps).sqrt()

    def forward_pred(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.forward_decoder(self.forward_encoder(images)), self.target(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pred, target = self.forward_pred(images)
        return F.mse_loss(pred.float(), target)


_PRETRAINER_ARGS = ('cluster_size', 'tap_layers', 'decoder_embed_dim', 'decoder_depth', 'decoder_num_heads',
                    'decoder_mlp_ratio', 'norm_pix_eps', 'in_chans', 'device', 'dtype')


def encoder_kwargs(pretrainer_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The ArmMamba arguments among create_pretrainer's keyword arguments (what shapes the encoder, not the decoder)."""
    return {k: v for k, v in pretrainer_kwargs.items() if k not in _PRETRAINER_ARGS or k == 'in_chans'}


def create_pretrainer(model_name: str = 'arm_mamba_base', img_size: Union[int, Tuple[int, int]] = 192,
                      **kwargs) -> ArmPretrainer:
    """ARM pretrainer around a registered timm ArmMamba variant (embed_dim, depth, patch size from the variant).

    Keyword arguments are pretrainer arguments (cluster_size, tap_layers, decoder_*) or ArmMamba arguments
    (embed_dim, depth, patch_size, mlp_ratio, d_state, drop_path_rate, ...), the latter overriding the variant.
    """
    import timm
    variant = timm.create_model(model_name, device='meta')
    if not isinstance(variant, ArmMamba):
        raise ValueError(f'{model_name} is not an ArmMamba variant (got {type(variant).__name__}).')
    args = dict(embed_dim=variant.embed_dim, depth=len(variant.blocks), patch_size=variant.patch_embed.patch_size)
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in _PRETRAINER_ARGS}
    for k in ('embed_dim', 'depth', 'patch_size'):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    return ArmPretrainer(img_size=img_size, **args, **own, encoder_args=kwargs or None)
