""" Depthwise causal conv + SiLU of K scan directions in Triton, forward and backward, token-major (the layout of
``scan``): the conv runs along each direction's scan order.

    u[k, order[k, t]] = silu(bias_k + sum_j w_kj x[order[k, t - W + 1 + j]])    (zero before the first step)
read straight from the in-projection's output. A program walks a run of steps of one (image, direction),
keeping the last W - 1 inputs in registers: every input row is read once, not once per tap. Its backward
(recomputing the pre-activation the same way) writes d(pre-activation) in scan order, then sums, for every token,
the contributions of all K directions into one dx.
"""
import torch
import triton
import triton.language as tl

from .launch import launch
from .scan import bkl_strides, token_positions

__all__ = ['conv_forward', 'conv_backward', 'check_width']

# conv programs: scan steps walked per program, channels, warps (forward, and the backward's d(pre-activation));
# dx tiles (tokens, channels, warps)
CONV_STEPS, CONV_BLOCK_D, CONV_WARPS = 64, 128, 1
CONV_BWD_STEPS, CONV_BWD_BLOCK_D, CONV_BWD_WARPS = 64, 128, 1
CONV_DX_BLOCK_T, CONV_DX_BLOCK_D, CONV_DX_WARPS = 16, 64, 2  # swept on an H200 at ARM-B's shape


@triton.jit
def _conv_row(x_base, order_ptr, k, t, seqlen, sx_l, mask_d, HAS_ORDER: tl.constexpr):
    """x at scan step t of direction k, (BLOCK_D,) as stored; zero outside 0 <= t < seqlen."""
    return _row_at(x_base, token_positions(order_ptr, k, t, seqlen, HAS_ORDER), t, seqlen, sx_l, mask_d)


@triton.jit
def _row_at(base, pos, t, seqlen, stride, mask_d):
    """The row of token pos (scan step t), as stored, and pos; zero outside 0 <= t < seqlen."""
    return tl.load(base + pos * stride, mask=mask_d & (t >= 0) & (t < seqlen), other=0.), pos


@triton.jit
def _tap(w_ptr, row, back: tl.constexpr, mask_d, W: tl.constexpr):
    """The weight of the input `back` steps before the output (tap W - 1 - back); zero for back >= W."""
    if back < W:
        w = tl.load(w_ptr + row * W + W - 1 - back, mask=mask_d, other=0.).to(tl.float32)
    else:
        w = tl.zeros(row.shape, dtype=tl.float32)
    return w


@triton.jit
def _conv_window(x_ptr, w_ptr, bias_ptr, order_ptr, sx_b, sx_l, seqlen, d_inner, num_dirs,
                 W: tl.constexpr, STEPS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ORDER: tl.constexpr):
    """Setup of a sliding-window conv program: BLOCK_D channels of direction k, image b (program axis 2 is
    k * batch + b), scan steps t0 ... t0 + STEPS - 1. Returns the taps' weights, the bias, the inputs of the
    three steps before t0 (the window, oldest first) and the coordinates."""
    pid_d, kb = tl.program_id(0), tl.program_id(2)
    batch = tl.num_programs(2) // num_dirs
    k, b = kb // batch, kb % batch
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_inner
    row = k * d_inner + offs_d
    w0, w1 = _tap(w_ptr, row, 0, mask_d, W), _tap(w_ptr, row, 1, mask_d, W)
    w2, w3 = _tap(w_ptr, row, 2, mask_d, W), _tap(w_ptr, row, 3, mask_d, W)
    bias = tl.load(bias_ptr + row, mask=mask_d, other=0.).to(tl.float32)
    x_base = x_ptr + b.to(tl.int64) * sx_b + offs_d
    t0 = tl.program_id(1) * STEPS
    x3, _ = _conv_row(x_base, order_ptr, k, t0 - 3, seqlen, sx_l, mask_d, HAS_ORDER)
    x2, _ = _conv_row(x_base, order_ptr, k, t0 - 2, seqlen, sx_l, mask_d, HAS_ORDER)
    x1, _ = _conv_row(x_base, order_ptr, k, t0 - 1, seqlen, sx_l, mask_d, HAS_ORDER)
    return (w0, w1, w2, w3, bias, x_base, x3.to(tl.float32), x2.to(tl.float32), x1.to(tl.float32), t0, kb, k,
            b, offs_d, mask_d)


@triton.jit
def _conv_fwd(
        x_ptr, w_ptr, bias_ptr, order_ptr, u_ptr, sx_b, sx_l, seqlen, d_inner, num_dirs,
        W: tl.constexpr, STEPS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    """u at STEPS consecutive scan steps, walking them with the last three inputs kept in registers: every
    input row is read once (plus three before the first step), not once per tap."""
    w0, w1, w2, w3, bias, x_base, x3, x2, x1, t0, kb, k, b, offs_d, mask_d = _conv_window(
        x_ptr, w_ptr, bias_ptr, order_ptr, sx_b, sx_l, seqlen, d_inner, num_dirs, W, STEPS, BLOCK_D, HAS_ORDER)
    u_base = u_ptr + kb.to(tl.int64) * seqlen * d_inner + offs_d  # (K, b, L, d), token order
    # the next step's input is loaded one iteration ahead, its position two: no load waits on another
    x_n, pos_n = _conv_row(x_base, order_ptr, k, t0, seqlen, sx_l, mask_d, HAS_ORDER)
    pos_nn = token_positions(order_ptr, k, t0 + 1, seqlen, HAS_ORDER)
    for i in range(tl.minimum(STEPS, seqlen - t0)):
        x0, pos = x_n.to(tl.float32), pos_n
        x_n, pos_n = _row_at(x_base, pos_nn, t0 + i + 1, seqlen, sx_l, mask_d)
        pos_nn = token_positions(order_ptr, k, t0 + i + 2, seqlen, HAS_ORDER)
        pre = bias + x3 * w3 + x2 * w2 + x1 * w1 + x0 * w0
        tl.store(u_base + pos * d_inner, (pre * tl.sigmoid(pre)).to(u_ptr.dtype.element_ty), mask=mask_d)
        x3, x2, x1 = x2, x1, x0


@triton.jit
def _conv_bwd_pre(
        x_ptr, w_ptr, bias_ptr, order_ptr, du_ptr, dpre_ptr, dw_ptr,
        sx_b, sx_l, sdu_b, sdu_k, sdu_l, seqlen, d_inner, num_dirs,
        W: tl.constexpr, STEPS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    """d(pre-activation) in scan order, and per-program partial sums of dw (W rows) and dbias (row W), walking
    STEPS steps with the pre-activation recomputed from a sliding window of inputs (as the forward)."""
    w0, w1, w2, w3, bias, x_base, x3, x2, x1, t0, kb, k, b, offs_d, mask_d = _conv_window(
        x_ptr, w_ptr, bias_ptr, order_ptr, sx_b, sx_l, seqlen, d_inner, num_dirs, W, STEPS, BLOCK_D, HAS_ORDER)
    du_base = du_ptr + b.to(tl.int64) * sdu_b + k * sdu_k + offs_d
    dpre_base = dpre_ptr + kb.to(tl.int64) * seqlen * d_inner + offs_d  # (K, b, L, d), scan order
    dw0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw1, dw2, dw3, db = dw0, dw0, dw0, dw0
    x_n, pos_n = _conv_row(x_base, order_ptr, k, t0, seqlen, sx_l, mask_d, HAS_ORDER)
    g_n, _ = _row_at(du_base, pos_n, t0, seqlen, sdu_l, mask_d)
    pos_nn = token_positions(order_ptr, k, t0 + 1, seqlen, HAS_ORDER)
    for i in range(tl.minimum(STEPS, seqlen - t0)):
        t = t0 + i
        x0, g = x_n.to(tl.float32), g_n.to(tl.float32)
        x_n, _ = _row_at(x_base, pos_nn, t + 1, seqlen, sx_l, mask_d)  # as in the forward
        g_n, _ = _row_at(du_base, pos_nn, t + 1, seqlen, sdu_l, mask_d)
        pos_nn = token_positions(order_ptr, k, t + 2, seqlen, HAS_ORDER)
        pre = bias + x3 * w3 + x2 * w2 + x1 * w1 + x0 * w0
        s = tl.sigmoid(pre)
        dpre = g * s * (1. + pre * (1. - s))
        tl.store(dpre_base + t * d_inner, dpre.to(dpre_ptr.dtype.element_ty), mask=mask_d)
        dw0 += dpre * x0
        dw1 += dpre * x1
        dw2 += dpre * x2
        dw3 += dpre * x3
        db += dpre
        x3, x2, x1 = x2, x1, x0
    part = dw_ptr + ((kb * tl.num_programs(1) + tl.program_id(1)) * (W + 1)) * d_inner + offs_d
    tl.store(part + (W - 1) * d_inner, dw0, mask=mask_d)  # tap W - 1 - back holds the sum for `back`
    if W > 1:
        tl.store(part + (W - 2) * d_inner, dw1, mask=mask_d)
    if W > 2:
        tl.store(part + (W - 3) * d_inner, dw2, mask=mask_d)
    if W > 3:
        tl.store(part + (W - 4) * d_inner, dw3, mask=mask_d)
    tl.store(part + W * d_inner, db, mask=mask_d)


@triton.jit
def _conv_bwd_dx(
        dpre_ptr, w_ptr, inverse_ptr, dx_ptr, sdx_b, sdx_l, seqlen, d_inner, num_dirs,
        W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ORDER: tl.constexpr,
):
    """dx at each token: sum over directions and taps of w * d(pre-activation) of the steps that read it."""
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_inner
    p = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # tokens
    mask_p = p < seqlen
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(num_dirs):
        s = token_positions(inverse_ptr, k, p, seqlen, HAS_ORDER)  # the scan step at which direction k reads p
        dpre_base = dpre_ptr + (k * tl.num_programs(2) + b.to(tl.int64)) * seqlen * d_inner + offs_d[None, :]
        row = k * d_inner + offs_d
        for j in tl.static_range(W):
            step = s + (W - 1) - j  # the step whose tap j reads token p
            valid = mask_p & (step < seqlen)
            g = tl.load(dpre_base + step[:, None] * d_inner, mask=valid[:, None] & mask_d[None, :], other=0.)
            acc += g.to(tl.float32) * tl.load(w_ptr + row * W + j, mask=mask_d, other=0.).to(tl.float32)[None, :]
    tl.store(dx_ptr + b.to(tl.int64) * sdx_b + p[:, None] * sdx_l + offs_d[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])


def check_width(width: int) -> None:
    if not 1 <= width <= 4:
        raise ValueError(f'causal_conv1d: the Triton conv takes widths 1 to 4 (as causal-conv1d), got {width}; '
                         f"use backend='torch' for wider convs")


def conv_forward(x, weight, bias, order, direction_major: bool = False):
    """u as a (b, K, L, d) view of direction-major memory, or the (K, b L, d) tensor itself (direction_major)."""
    batch, seqlen, d_inner = x.shape
    num_dirs, _, width = weight.shape
    u = torch.empty((num_dirs, batch, seqlen, d_inner), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(d_inner, CONV_BLOCK_D), triton.cdiv(seqlen, CONV_STEPS), batch * num_dirs)
    launch(_conv_fwd, grid, x, weight, bias, order if order is not None else weight, u, x.stride(0), x.stride(1),
            seqlen, d_inner, num_dirs, W=width, STEPS=CONV_STEPS, BLOCK_D=CONV_BLOCK_D, HAS_ORDER=order is not None,
            num_warps=CONV_WARPS)
    return u.view(num_dirs, batch * seqlen, d_inner) if direction_major else u.transpose(0, 1)


def conv_backward(du, x, weight, bias, order, inverse, dx=None):
    """du: (b, K, L, d), or direction-major (K, b L, d)."""
    batch, seqlen, d_inner = x.shape
    num_dirs, _, width = weight.shape
    t_blocks = triton.cdiv(seqlen, CONV_BWD_STEPS)
    f32 = torch.float32
    # d(pre-activation) in the activations' dtype: fp32 only where they are (dw sums it in fp32 inside the kernel)
    dpre = torch.empty((num_dirs, batch, seqlen, d_inner), device=x.device, dtype=x.dtype)
    dw = torch.empty((num_dirs * batch, t_blocks, width + 1, d_inner), device=x.device, dtype=f32)
    has_order = order is not None
    grid = (triton.cdiv(d_inner, CONV_BWD_BLOCK_D), t_blocks, batch * num_dirs)
    du_strides = bkl_strides(du, batch if du.dim() == 3 else None)
    launch(_conv_bwd_pre, grid, x, weight, bias, order if has_order else weight, du, dpre, dw, x.stride(0),
            x.stride(1), *du_strides[:3], seqlen, d_inner, num_dirs, W=width, STEPS=CONV_BWD_STEPS,
            BLOCK_D=CONV_BWD_BLOCK_D, HAS_ORDER=has_order, num_warps=CONV_BWD_WARPS)
    if dx is None:
        dx = torch.empty((batch, seqlen, d_inner), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(d_inner, CONV_DX_BLOCK_D), triton.cdiv(seqlen, CONV_DX_BLOCK_T), batch)
    launch(_conv_bwd_dx, grid, dpre, weight, inverse if has_order else weight, dx, dx.stride(0), dx.stride(1),
            seqlen, d_inner, num_dirs, W=width, BLOCK_T=CONV_DX_BLOCK_T, BLOCK_D=CONV_DX_BLOCK_D,
            HAS_ORDER=has_order, num_warps=CONV_DX_WARPS)
    dw = dw.view(num_dirs, batch, t_blocks, width + 1, d_inner).sum((1, 2))  # (K, W + 1, d)
    return dx, dw[:, :width].transpose(1, 2), dw[:, width]
