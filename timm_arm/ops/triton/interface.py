""" The Triton kernels as PyTorch ops: autograd functions, and the checked entry points ``timm_arm.ops.dispatch``
calls (every shape checked before a launch).

    mixer(x, weights, order, inverse)       a whole K-direction mixer, in-projection to out-projection
    mixer_core(xz, weights, order, inverse) its core, from the in-projection's output [x, z]
    selective_scan / selective_scan_tokens  the scan alone, channel-first (mamba-ssm's layout) / token-major
    swiglu_mlp(x, fc1_weight, ...)          a SwiGLU MLP
    add_layer_norm(residual, branch, ...)   a residual add and the LayerNorm after it, forward only

The mixer and the MLP are one autograd node each, as mamba-ssm's ``mamba_inner_fn``: the projections' weight casts,
GEMMs and gradients cost no autograd nodes of their own, which is host time per layer where a training step is
partly host-bound (ARM-L on an H200's host). Dtypes are those of nn.Linear under autocast: the GEMMs in the
autocast dtype, the gradients in the inputs' and weights' own.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..mixer_weights import MixerWeights
from .conv import check_width, conv_backward, conv_forward
from .gate import gate_backward, gate_forward
from .layer_norm import add_layer_norm_forward
from .scan import ScanConfig, scan_config, scan_forward
from .scan_backward import scan_backward
from .swiglu import swiglu_backward, swiglu_forward
from .utils import cast, channels_last, compute_dtype, dense

__all__ = ['mixer', 'mixer_core', 'selective_scan', 'selective_scan_tokens', 'swiglu_mlp', 'add_layer_norm']


def _check_order(order: Optional[torch.Tensor], num_dirs: int, seqlen: int, name: str = 'order'):
    if order is None:
        return None
    if order.shape != (num_dirs, seqlen):
        raise ValueError(f'selective_scan: {name} must be (directions, L) = {(num_dirs, seqlen)}, got '
                         f'{tuple(order.shape)}')
    return dense(cast(order, torch.int32))


# --- selective scan ---------------------------------------------------------------------------------------------

class _ScanTokens(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus, order, cfg):
        u, delta, B, C = (channels_last(t) for t in (u, delta, B, C))
        y = scan_forward(u, delta, A, B, C, D, delta_bias, softplus, order, cfg)
        if any(ctx.needs_input_grad[:7]):
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, order)
            ctx.softplus, ctx.cfg = softplus, cfg
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, order = ctx.saved_tensors
        grads = scan_backward(channels_last(dy), u, delta, A, B, C, D, delta_bias, ctx.softplus, order, ctx.cfg)
        dA = grads[2].to(A.dtype)
        return grads[:2] + (dA,) + grads[3:] + (None, None, None)


def selective_scan_tokens(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor] = None,
        delta_bias: Optional[torch.Tensor] = None,
        delta_softplus: bool = False,
        order: Optional[torch.Tensor] = None,
        config: Optional[ScanConfig] = None,
) -> torch.Tensor:
    """Selective scan of K directions over one token sequence, token-major (the layout of ``timm_arm.ops.triton.scan``).

    u, delta: (b, K, L, d);  A: (K, d, N);  B, C: (b, K, L, N);  D, delta_bias: (K, d);  order: (K, L) token
    index of each scan step (None: token order). Any strides with channels (and states) contiguous are read as
    they are. Returns y (b, K, L, d) in u's dtype, y[:, k, p] being direction k's output at token p.
    """
    batch, num_dirs, seqlen, d_inner = u.shape
    d_state = A.shape[-1]
    if delta.shape != u.shape:
        raise ValueError(f'selective_scan: delta must be shaped like u {tuple(u.shape)}, got {tuple(delta.shape)}')
    if A.shape != (num_dirs, d_inner, d_state):
        raise ValueError(f'selective_scan: A must be (K, d, N) = {(num_dirs, d_inner, d_state)}, got {tuple(A.shape)}')
    if B.shape != (batch, num_dirs, seqlen, d_state) or C.shape != B.shape:
        raise ValueError(f'selective_scan: B, C must be {(batch, num_dirs, seqlen, d_state)}, got '
                         f'{tuple(B.shape)}, {tuple(C.shape)}')
    for name, p in (('D', D), ('delta_bias', delta_bias)):
        if p is not None and p.numel() != num_dirs * d_inner:
            raise ValueError(f'selective_scan: {name} must have K * d = {num_dirs * d_inner} values')
    order = _check_order(order, num_dirs, seqlen)
    cfg = config or scan_config(d_inner, seqlen, d_state)
    A = A.float().contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    return _ScanTokens.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, order, cfg)


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
        config: Optional[ScanConfig] = None,
) -> torch.Tensor:
    """``timm_arm.ops.selective_scan`` on the Triton kernels, in mamba-ssm's channel-first layout
    (``selective_scan_torch``'s shapes): u, delta, z (b, G*d, L), B, C (b, G, N, L), A (G*d, N). Reads the inputs
    through strided views (no copies); the gate silu(z) is applied on the output."""
    batch, channels, seqlen = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    if channels % groups:
        raise ValueError(f'selective_scan: {channels} channels cannot be split into {groups} groups of B/C')
    if B.shape != (batch, groups, d_state, seqlen) or C.shape != B.shape:
        raise ValueError(f'selective_scan: B, C must be {(batch, groups, d_state, seqlen)}, got {B.shape}, {C.shape}')
    d = channels // groups
    tokens = lambda t: t.unflatten(1, (groups, d)).transpose(2, 3)  # (b, G, L, d)
    y = selective_scan_tokens(
        tokens(u), tokens(delta), A.view(groups, d, d_state), B.transpose(2, 3), C.transpose(2, 3),
        D.view(groups, d) if D is not None else None, delta_bias.view(groups, d) if delta_bias is not None else None,
        delta_softplus, None, config)
    y = y.transpose(2, 3).reshape(batch, channels, seqlen)
    if z is not None:
        y = (y.float() * F.silu(z.float())).to(u.dtype)
    return y

# --- mixer ------------------------------------------------------------------------------------------------------

def _core_forward(xz: torch.Tensor, w: MixerWeights, order, cfg: ScanConfig):
    """conv -> x_proj -> dt_proj -> scan of K directions -> mean over directions -> gate by silu(z), from the
    in-projection's output xz = [x, z] (b, L, 2d). Returns (out (b, L, d), the tensors the backward keeps).

    Keeps the conv output u, the thin x_proj output and the mean for the backward, and recomputes delta there (a
    thin matmul) instead of keeping a second (b, K, L, d) activation per layer. (Recomputing u too, a conv, would
    save one more: ARM-B 1.6 GiB of training memory for about 3 % more time per step on an H200.)
    Direction-major activations (K, b L, c): the projections are K plain batched matmuls and the kernels are given
    strides, not views.
    """
    num_dirs, d_inner, _, rank = w.shape
    dtype, batch = xz.dtype, xz.shape[0]
    u = conv_forward(xz[..., :d_inner], w.conv_weight, w.conv_bias, order, direction_major=True)
    w_x, w_dt = cast(w.x_proj_weight, dtype), cast(w.dt_proj_weight, dtype)  # kept for the backward (small)
    x_dbl = torch.bmm(u, w_x.transpose(1, 2))  # (K, b L, R + 2N)
    delta = torch.bmm(x_dbl[..., :rank], w_dt.transpose(1, 2))  # (K, b L, d)
    B, C = x_dbl[..., rank:].chunk(2, dim=-1)
    y = scan_forward(u, delta, w.A_log, B, C, w.D, w.dt_proj_bias, True, order, cfg, a_is_log=True, batch=batch)
    del delta
    out, mean = gate_forward(y, xz[..., d_inner:], num_dirs)
    return out, (xz, w.conv_weight, w.conv_bias, w_x, w_dt, w.dt_proj_bias, w.A_log, w.D, x_dbl, mean, u)


def _core_backward(dout: torch.Tensor, saved, order, inverse, cfg: ScanConfig):
    """The gradients of ``_core_forward``'s inputs: xz, then the seven core weights (x_proj / dt_proj in the
    activations' dtype), from dout (b, L, d) with contiguous channels."""
    xz, conv_weight, conv_bias, w_x, w_dt, dt_proj_bias, A_log, D, x_dbl, mean, u = saved
    (num_dirs, d_inner, _), rank = A_log.shape, w_dt.shape[-1]
    batch, seqlen = xz.shape[:2]
    dxz = torch.empty_like(xz)
    dy = gate_backward(dout, mean, xz[..., d_inner:], dxz[..., d_inner:], num_dirs)

    dt = x_dbl[..., :rank]
    delta = torch.bmm(dt, w_dt.transpose(1, 2))
    B, C = x_dbl[..., rank:].chunk(2, dim=-1)
    dy = dy.unsqueeze(1).expand(batch, num_dirs, seqlen, d_inner)  # the same for every direction: stride 0
    du, ddelta, dA_log, dB, dC, dD, dbias = scan_backward(
        dy, u, delta, A_log, B, C, D, dt_proj_bias, True, order, cfg, a_is_log=True, batch=batch)
    del delta
    d_w_dt = torch.bmm(ddelta.transpose(1, 2), dt)  # (K, d, R)
    dx_dbl = torch.cat([torch.bmm(ddelta, w_dt), dB, dC], dim=-1)  # (K, b L, R + 2N)
    del ddelta
    du.baddbmm_(dx_dbl, w_x)
    d_w_x = torch.bmm(dx_dbl.transpose(1, 2), u)  # (K, R + 2N, d)
    del u, dx_dbl
    _, d_conv_w, d_conv_b = conv_backward(du, xz[..., :d_inner], conv_weight, conv_bias, order, inverse,
                                          dxz[..., :d_inner])
    return (dxz, cast(d_conv_w, conv_weight.dtype), cast(d_conv_b, conv_bias.dtype), d_w_x, d_w_dt, dbias,
            cast(dA_log, A_log.dtype), dD)


class _MixerCore(torch.autograd.Function):
    """``_core_forward`` as one autograd node taking the in-projection's output xz = [x, z]; the seven core weights
    last, in ``MixerWeights`` order."""

    @staticmethod
    def forward(ctx, xz, order, inverse, cfg, *core):
        w = MixerWeights(*core)
        out, saved = _core_forward(xz, w, order, cfg)
        ctx.save_for_backward(order, inverse, *saved)
        ctx.weight_dtypes = w.x_proj_weight.dtype, w.dt_proj_weight.dtype
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        order, inverse, *saved = ctx.saved_tensors
        dxz, *grads = _core_backward(channels_last(dout), saved, order, inverse, ctx.cfg)
        x_proj_dtype, dt_proj_dtype = ctx.weight_dtypes
        grads[2], grads[3] = cast(grads[2], x_proj_dtype), cast(grads[3], dt_proj_dtype)
        return dxz, None, None, None, *grads


class _Mixer(torch.autograd.Function):
    """The whole mixer, in-projection -> ``_core_forward`` -> out-projection, as one autograd node; the weights
    last: in_proj, out_proj, then the seven of the core."""

    @staticmethod
    def forward(ctx, x, order, inverse, cfg, in_proj_weight, out_proj_weight, *core):
        w = MixerWeights(*core)
        dtype = compute_dtype(x)
        batch, seqlen, dim = x.shape
        x2 = cast(x.reshape(batch * seqlen, dim), dtype)
        w_in, w_out = cast(in_proj_weight, dtype), cast(out_proj_weight, dtype)
        xz = torch.mm(x2, w_in.t()).view(batch, seqlen, -1)
        out, saved = _core_forward(xz, w, order, cfg)
        y = torch.mm(out.view(batch * seqlen, -1), w_out.t())
        ctx.save_for_backward(x2, w_in, w_out, out, order, inverse, *saved)
        ctx.dtypes = (x.dtype, in_proj_weight.dtype, out_proj_weight.dtype, w.x_proj_weight.dtype,
                      w.dt_proj_weight.dtype)
        ctx.cfg = cfg
        return y.view(batch, seqlen, -1)

    @staticmethod
    def backward(ctx, dy):
        x2, w_in, w_out, out, order, inverse, *saved = ctx.saved_tensors
        x_dtype, in_dtype, out_dtype, x_proj_dtype, dt_proj_dtype = ctx.dtypes
        batch, seqlen, dim = dy.shape
        dy2 = cast(dy.reshape(batch * seqlen, dim), w_out.dtype)
        d_w_out = cast(torch.mm(dy2.t(), out.view(batch * seqlen, -1)), out_dtype)
        dout = torch.mm(dy2, w_out).view(batch, seqlen, -1)
        dxz, *grads = _core_backward(dout, saved, order, inverse, ctx.cfg)
        grads[2], grads[3] = cast(grads[2], x_proj_dtype), cast(grads[3], dt_proj_dtype)
        dxz = dxz.view(batch * seqlen, -1)
        dx = cast(torch.mm(dxz, w_in).view(batch, seqlen, dim), x_dtype) if ctx.needs_input_grad[0] else None
        d_w_in = cast(torch.mm(dxz.t(), x2), in_dtype)
        return dx, None, None, None, d_w_in, d_w_out, *grads


def _checked(w: MixerWeights, xz_width: int, seqlen: int, order, inverse):
    """(core weights as the kernels read them, order, inverse, tile config), or a ValueError naming the mismatch."""
    num_dirs, d_inner, d_state, rank = w.shape
    if xz_width != 2 * d_inner or w.conv_weight.shape[:2] != (num_dirs, d_inner) or w.x_proj_weight.shape[1:] != (
            rank + 2 * d_state, d_inner):
        raise ValueError(f'mixer: in-projection width {xz_width}, conv_weight {tuple(w.conv_weight.shape)}, '
                         f'x_proj_weight {tuple(w.x_proj_weight.shape)} do not fit A_log {tuple(w.A_log.shape)}')
    if (order is None) != (inverse is None):
        raise ValueError('mixer: order and inverse go together')
    check_width(w.conv_weight.shape[-1])
    core = (dense(w.conv_weight), dense(w.conv_bias), w.x_proj_weight, w.dt_proj_weight, dense(w.dt_proj_bias),
            dense(cast(w.A_log, torch.float32)), dense(w.D))
    return (core, _check_order(order, num_dirs, seqlen), _check_order(inverse, num_dirs, seqlen, 'inverse'),
            scan_config(d_inner, seqlen, d_state))


@torch.compiler.disable  # Triton launches and their autograd node stay opaque to torch.compile (a graph break)
def mixer_core(
        xz: torch.Tensor,
        weights: MixerWeights,
        order: Optional[torch.Tensor] = None,
        inverse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``timm_arm.ops.mixer_core`` on the Triton kernels: xz (b, L, 2d) = [x, z] with contiguous channels; order /
    inverse (K, L) scan orders and their inverses, or None (one direction in token order). Returns (b, L, d)."""
    core, order, inverse, cfg = _checked(weights, xz.shape[-1], xz.shape[1], order, inverse)
    return _MixerCore.apply(channels_last(xz), order, inverse, cfg, *core)


@torch.compiler.disable
def mixer(
        x: torch.Tensor,
        weights: MixerWeights,
        order: Optional[torch.Tensor] = None,
        inverse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``timm_arm.ops.mixer`` on the Triton kernels as one autograd node, x (b, L, dim) -> (b, L, dim)."""
    w_in, w_out = weights.in_proj_weight, weights.out_proj_weight
    if w_in is None or w_out is None:
        raise ValueError('mixer: the weights need in_proj_weight and out_proj_weight (mixer_core runs without)')
    if x.dim() != 3 or w_in.shape[1] != x.shape[-1] or w_out.shape[1] != weights.A_log.shape[1]:
        raise ValueError(f'mixer: x {tuple(x.shape)}, in_proj_weight {tuple(w_in.shape)}, out_proj_weight '
                         f'{tuple(w_out.shape)} do not fit A_log {tuple(weights.A_log.shape)}')
    core, order, inverse, cfg = _checked(weights, w_in.shape[0], x.shape[1], order, inverse)
    return _Mixer.apply(x, order, inverse, cfg, w_in, w_out, *core)


# --- SwiGLU MLP -------------------------------------------------------------------------------------------------

def _pad_rows(w: Optional[torch.Tensor], parts: int, rows: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """w (parts * r, ...) cast to dtype, each of its ``parts`` blocks of rows zero-padded to ``rows``."""
    if w is None:
        return None
    w = cast(w, dtype)
    pad = rows - w.shape[0] // parts
    if pad == 0:
        return w
    w = w.unflatten(0, (parts, -1))
    return F.pad(w, (0, 0) * (w.dim() - 2) + (0, pad)).flatten(0, 1)


def _unpad_rows(g: Optional[torch.Tensor], parts: int, rows: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The inverse of ``_pad_rows`` for a gradient: (parts * rows_padded, ...) -> (parts * rows, ...) in dtype."""
    if g is None:
        return None
    if g.shape[0] != parts * rows:
        return g.unflatten(0, (parts, -1))[:, :rows].to(dtype, memory_format=torch.contiguous_format).flatten(0, 1)
    return cast(g, dtype)


class _SwiGLUMlp(torch.autograd.Function):
    """fc2(silu(gate) * value) of fc1's two halves as one autograd node: two GEMMs and one elementwise kernel each
    way, with no separate autograd nodes (host time) for the weight casts, the GEMMs or the padding.

    The hidden width is zero-padded to a multiple of 8 inside (fc1's halves' rows, fc2's columns): rows of 2730
    bf16 values (ARM-L's width) are not 16-byte aligned and send cuBLAS to slow kernels. The padded columns of
    the hidden activation are silu(0) * 0 = 0, so results are those of the unpadded MLP; the weights' gradients are
    returned unpadded. Dtypes as nn.Linear under autocast."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, gate_last):
        dtype = compute_dtype(x)
        hidden = w2.shape[1]
        padded = hidden + (-hidden % 8)
        x2 = cast(x.reshape(-1, x.shape[-1]), dtype)
        w1c, b1c = _pad_rows(w1, 2, padded, dtype), _pad_rows(b1, 2, padded, dtype)
        w2c = cast(w2, dtype)
        if padded != hidden:
            w2c = F.pad(w2c, (0, padded - hidden))
        a = torch.addmm(b1c, x2, w1c.t()) if b1c is not None else torch.mm(x2, w1c.t())
        h = swiglu_forward(a, gate_last)
        y = torch.addmm(cast(b2, dtype), h, w2c.t()) if b2 is not None else torch.mm(h, w2c.t())
        ctx.save_for_backward(x2, w1c, a, h, w2c)
        ctx.meta = x.dtype, w1.dtype, b1.dtype if b1 is not None else None, w2.dtype, \
            b2.dtype if b2 is not None else None, hidden, gate_last
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, w1c, a, h, w2c = ctx.saved_tensors
        x_dtype, w1_dtype, b1_dtype, w2_dtype, b2_dtype, hidden, gate_last = ctx.meta
        lead = dy.shape[:-1]
        dy2 = cast(dy.reshape(-1, dy.shape[-1]), h.dtype)
        d_w2 = torch.mm(dy2.t(), h)
        d_w2 = cast(d_w2, w2_dtype) if d_w2.shape[1] == hidden else \
            d_w2[:, :hidden].to(w2_dtype, memory_format=torch.contiguous_format)
        d_b2 = cast(dy2.sum(0), b2_dtype) if b2_dtype is not None else None
        da = swiglu_backward(a, torch.mm(dy2, w2c), gate_last)
        del a, h
        d_w1 = _unpad_rows(torch.mm(da.t(), x2), 2, hidden, w1_dtype)
        d_b1 = _unpad_rows(da.sum(0), 2, hidden, b1_dtype) if b1_dtype is not None else None
        dx = cast(torch.mm(da, w1c).view(*lead, -1), x_dtype) if ctx.needs_input_grad[0] else None
        return dx, d_w1, d_b1, d_w2, d_b2, None


@torch.compiler.disable
def swiglu_mlp(
        x: torch.Tensor,
        fc1_weight: torch.Tensor,
        fc1_bias: Optional[torch.Tensor],
        fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor],
        gate_last: bool = False,
) -> torch.Tensor:
    """fc2(silu(gate) * value) with [gate; value] = fc1(x) (timm GluMlp's halves: gate first unless gate_last) as
    one autograd node: fc1_weight (2 H, C), fc2_weight (C_out, H)."""
    hidden = fc2_weight.shape[1]
    if fc1_weight.shape != (2 * hidden, x.shape[-1]) or (fc1_bias is not None and fc1_bias.shape != (2 * hidden,)):
        raise ValueError(f'swiglu_mlp: fc1 weight {tuple(fc1_weight.shape)} does not map x {tuple(x.shape)} to the '
                         f'2 x {hidden} gate and value halves fc2 weight {tuple(fc2_weight.shape)} takes')
    return _SwiGLUMlp.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, bool(gate_last))


# --- residual add + LayerNorm -----------------------------------------------------------------------------------

@torch.compiler.disable
def add_layer_norm(residual: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor], eps: float,
                   out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(residual + branch, LayerNorm of it in out_dtype) as one kernel, without gradients (``ops.add_layer_norm``
    takes PyTorch's ops where they are needed); branch None: (residual, LayerNorm of residual)."""
    total, out, _ = add_layer_norm_forward(residual, branch, weight, bias, eps, out_dtype)
    return (residual, out) if branch is None else (total, out)
