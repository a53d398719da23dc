""" A deliberately plain implementation of the reference ARM classifier, for tests.

It reads a state dict in the public reference code's layout (layers.{i}.mixer.x_proj_b.weight, A_c_log, mlp.w1,
norm_f, head, ...) and follows the paper's semantics literally: four separate sequential scans, the backward
directions as flips of the whole sequence, the column directions as a transpose of the patch grid with the class
token held in the middle, each direction gated by its own SiLU(z), outputs mapped back, summed and divided by 4.
Written from the method description (ARM.md), not from the reference code.
"""
from typing import Dict

import torch
import torch.nn.functional as F

from timm_arm.ops import selective_scan_sequential

SUFFIXES = ('', '_b', '_c', '_c_b')


def _insert(x: torch.Tensor, token: torch.Tensor, index: int) -> torch.Tensor:
    return torch.cat([x[..., :index], token, x[..., index:]], dim=-1)


def _transpose_patches(x: torch.Tensor, grid, mid: int, inverse: bool = False) -> torch.Tensor:
    """(B, C, L) with the class token at mid -> patches re-ordered column-major (or back), class token kept."""
    H, W = grid
    cls, patches = x[..., mid:mid + 1], torch.cat([x[..., :mid], x[..., mid + 1:]], dim=-1)
    B, C, _ = patches.shape
    if inverse:
        patches = patches.reshape(B, C, W, H).transpose(-1, -2).reshape(B, C, H * W)
    else:
        patches = patches.reshape(B, C, H, W).transpose(-1, -2).reshape(B, C, H * W)
    return _insert(patches, cls, mid)


def _direction(sd, prefix, suffix, xz):
    d = xz.shape[1] // 2
    x, z = xz[:, :d], xz[:, d:]
    w, b = sd[f'{prefix}conv1d{suffix}.weight'], sd[f'{prefix}conv1d{suffix}.bias']
    x = F.silu(F.conv1d(x, w, b, padding=w.shape[-1] - 1, groups=d)[..., :x.shape[-1]])
    x_dbl = torch.einsum('bdl,rd->brl', x, sd[f'{prefix}x_proj{suffix}.weight'])
    dt_w = sd[f'{prefix}dt_proj{suffix}.weight']
    rank, n = dt_w.shape[1], sd[f'{prefix}A{suffix}_log'].shape[1]
    dt, B, C = x_dbl.split([rank, n, n], dim=1)
    delta = torch.einsum('brl,dr->bdl', dt, dt_w)
    A = -torch.exp(sd[f'{prefix}A{suffix}_log'].float())
    return selective_scan_sequential(
        x, delta, A, B.unsqueeze(1), C.unsqueeze(1), sd[f'{prefix}D{suffix}'], z,
        delta_bias=sd[f'{prefix}dt_proj{suffix}.bias'], delta_softplus=True)


def reference_forward(sd: Dict[str, torch.Tensor], images: torch.Tensor, patch_size: int, eps: float = 1e-5):
    """Logits of the reference-layout classifier ``sd`` for ``images``."""
    x = F.conv2d(images, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch_size)
    B, C, H, W = x.shape
    mid = H * W // 2
    x = _insert(x.flatten(2), sd['cls_token'].reshape(1, C, 1).expand(B, -1, -1), mid)  # (B, C, L)
    x = x.transpose(1, 2) + sd['pos_embed']
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('layers.'))
    for i in range(depth):
        p = f'layers.{i}.'
        h = F.layer_norm(x, (C,), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], eps)
        xz = (h @ sd[p + 'mixer.in_proj.weight'].t()).transpose(1, 2)  # (B, 2d, L)
        xz_col = _transpose_patches(xz, (H, W), mid)
        y_fwd = _direction(sd, p + 'mixer.', '', xz)
        y_bwd = _direction(sd, p + 'mixer.', '_b', xz.flip(-1)).flip(-1)
        y_col = _direction(sd, p + 'mixer.', '_c', xz_col)
        y_col_bwd = _direction(sd, p + 'mixer.', '_c_b', xz_col.flip(-1)).flip(-1)
        y = (y_fwd + y_bwd + _transpose_patches(y_col + y_col_bwd, (H, W), mid, inverse=True)) / 4
        x = x + y.transpose(1, 2) @ sd[p + 'mixer.out_proj.weight'].t()
        h = F.layer_norm(x, (C,), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], eps)
        gate = F.silu(F.linear(h, sd[p + 'mlp.w1.weight'], sd[p + 'mlp.w1.bias']))
        value = F.linear(h, sd[p + 'mlp.w2.weight'], sd[p + 'mlp.w2.bias'])
        x = x + F.linear(gate * value, sd[p + 'mlp.w3.weight'], sd[p + 'mlp.w3.bias'])
    x = F.layer_norm(x, (C,), sd['norm_f.weight'], sd['norm_f.bias'], eps)
    pooled = torch.cat([x[:, :mid], x[:, mid + 1:]], dim=1).mean(1)
    return F.linear(pooled, sd['head.weight'], sd['head.bias'])


def to_reference_layout(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our 4-direction (or 1-direction) state dict -> the reference code's key layout."""
    out = {}
    for k, v in sd.items():
        if not k.startswith('blocks.'):
            k = {'norm.weight': 'norm_f.weight', 'norm.bias': 'norm_f.bias',
                 'head.fc.weight': 'head.weight', 'head.fc.bias': 'head.bias'}.get(k, k)
            out[k] = v
            continue
        _, i, rest = k.split('.', 2)
        p = f'layers.{i}.'
        if rest.startswith('mlp.fc1.'):
            kind = rest.rsplit('.', 1)[1]
            gate, value = v.chunk(2)
            out[f'{p}mlp.w1.{kind}'], out[f'{p}mlp.w2.{kind}'] = gate, value
        elif rest.startswith('mlp.fc2.'):
            out[p + 'mlp.w3.' + rest.rsplit('.', 1)[1]] = v
        elif rest.startswith('mixer.'):
            name = rest[len('mixer.'):]
            names = {
                'conv_weight': 'conv1d{}.weight', 'conv_bias': 'conv1d{}.bias', 'x_proj_weight': 'x_proj{}.weight',
                'dt_proj_weight': 'dt_proj{}.weight', 'dt_proj_bias': 'dt_proj{}.bias', 'A_log': 'A{}_log',
                'D': 'D{}',
            }
            if name in names:
                for s, t in zip(SUFFIXES, v):
                    out[p + 'mixer.' + names[name].format(s)] = t.unsqueeze(1) if name == 'conv_weight' else t
            else:
                out[p + rest] = v
        else:
            out[p + rest] = v
    return out
