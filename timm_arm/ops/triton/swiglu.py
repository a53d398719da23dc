""" silu(gate) * value of the two halves of an MLP's fc1 output in Triton, read in place: one elementwise kernel
forward, one backward writing both halves' gradients as one tensor."""
import torch
import triton
import triton.language as tl

from .launch import launch

__all__ = ['swiglu_forward', 'swiglu_backward']

SWIGLU_BLOCK_R, SWIGLU_BLOCK_C = 8, 256


@triton.jit
def _swiglu_fwd(x_ptr, out_ptr, rows, width, sx_row, gate_col, value_col,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r, c] = silu(x[r, gate_col + c]) * x[r, value_col + c]: the two halves of one GEMM output, read in
    place (rows of x may be padded: sx_row >= 2 width)."""
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < width)[None, :]
    x_row = x_ptr + r.to(tl.int64)[:, None] * sx_row + c[None, :]
    a = tl.load(x_row + gate_col, mask=mask, other=0.).to(tl.float32)
    v = tl.load(x_row + value_col, mask=mask, other=0.).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * width + c[None, :],
             (a * tl.sigmoid(a) * v).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(x_ptr, dout_ptr, dx_ptr, rows, width, sx_row, sdo_row, gate_col, value_col,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx (rows, 2 width), contiguous: both halves' gradients in the layout of x."""
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < width)[None, :]
    r64 = r.to(tl.int64)[:, None]
    a = tl.load(x_ptr + r64 * sx_row + c[None, :] + gate_col, mask=mask, other=0.).to(tl.float32)
    v = tl.load(x_ptr + r64 * sx_row + c[None, :] + value_col, mask=mask, other=0.).to(tl.float32)
    g = tl.load(dout_ptr + r64 * sdo_row + c[None, :], mask=mask, other=0.).to(tl.float32)
    s = tl.sigmoid(a)
    dx_row = dx_ptr + r64 * (2 * width) + c[None, :]
    tl.store(dx_row + gate_col, (g * v * s * (1. + a * (1. - s))).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_row + value_col, (g * a * s).to(dx_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(x: torch.Tensor, gate_last: bool) -> torch.Tensor:
    """silu(gate) * value (rows, H) of x (rows, 2 H) = [gate | value] ([value | gate] where gate_last)."""
    rows, width = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, width), device=x.device, dtype=x.dtype)
    gate_col, value_col = (width, 0) if gate_last else (0, width)
    grid = (triton.cdiv(width, SWIGLU_BLOCK_C), triton.cdiv(rows, SWIGLU_BLOCK_R))
    launch(_swiglu_fwd, grid, x, out, rows, width, x.stride(0), gate_col, value_col, BLOCK_R=SWIGLU_BLOCK_R,
           BLOCK_C=SWIGLU_BLOCK_C, num_warps=4)
    return out


def swiglu_backward(x: torch.Tensor, dout: torch.Tensor, gate_last: bool) -> torch.Tensor:
    """The gradient (rows, 2 H) of ``swiglu_forward``'s input x, given the output's gradient dout (rows, H)."""
    rows, width = dout.shape
    dx = torch.empty((rows, 2 * width), device=x.device, dtype=x.dtype)
    gate_col, value_col = (width, 0) if gate_last else (0, width)
    grid = (triton.cdiv(width, SWIGLU_BLOCK_C), triton.cdiv(rows, SWIGLU_BLOCK_R))
    launch(_swiglu_bwd, grid, x, dout, dx, rows, width, x.stride(0), dout.stride(0), gate_col, value_col,
           BLOCK_R=SWIGLU_BLOCK_R, BLOCK_C=SWIGLU_BLOCK_C, num_warps=4)
    return dx
