""" The mixer's output gate in Triton: the mean of the K directions' scan outputs, times silu(z), forward and
backward, over the token-major layout of ``scan``."""
import torch
import triton
import triton.language as tl

from .launch import launch

__all__ = ['gate_forward', 'gate_backward']

GATE_BLOCK_T, GATE_BLOCK_D, GATE_WARPS = 16, 128, 4


@triton.jit
def _gate_fwd(y_ptr, z_ptr, out_ptr, mean_ptr, sz_b, sz_l, seqlen, d_inner, num_dirs,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """mean = (sum over directions of y) / K;  out = mean * silu(z).  y: (K, b, L, d) contiguous."""
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (t < seqlen)[:, None] & (offs_d < d_inner)[None, :]
    b64 = b.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(num_dirs):
        acc += tl.load(y_ptr + ((k * tl.num_programs(2) + b64) * seqlen + t[:, None]) * d_inner + offs_d[None, :],
                       mask=mask, other=0.).to(tl.float32)
    mean = acc / num_dirs
    z = tl.load(z_ptr + b64 * sz_b + t[:, None] * sz_l + offs_d[None, :], mask=mask, other=0.).to(tl.float32)
    row = (b64 * seqlen + t[:, None]) * d_inner + offs_d[None, :]
    tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + row, (mean * z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd(dout_ptr, mean_ptr, z_ptr, dy_ptr, dz_ptr, sdo_b, sdo_l, sz_b, sz_l, sdz_b, sdz_l,
              seqlen, d_inner, num_dirs, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dy = dout silu(z) / K (the gradient of every direction's y), dz = dout mean silu'(z)."""
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (t < seqlen)[:, None] & (offs_d < d_inner)[None, :]
    b64 = b.to(tl.int64)
    g = tl.load(dout_ptr + b64 * sdo_b + t[:, None] * sdo_l + offs_d[None, :], mask=mask, other=0.).to(
        tl.float32)
    z = tl.load(z_ptr + b64 * sz_b + t[:, None] * sz_l + offs_d[None, :], mask=mask, other=0.).to(tl.float32)
    row = (b64 * seqlen + t[:, None]) * d_inner + offs_d[None, :]
    mean = tl.load(mean_ptr + row, mask=mask, other=0.).to(tl.float32)
    s = tl.sigmoid(z)
    tl.store(dy_ptr + row, (g * z * s / num_dirs).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + b64 * sdz_b + t[:, None] * sdz_l + offs_d[None, :],
             (g * mean * s * (1. + z * (1. - s))).to(dz_ptr.dtype.element_ty), mask=mask)


def gate_forward(y: torch.Tensor, z: torch.Tensor, num_dirs: int):
    """(out, mean), each (b, L, d) in z's dtype: mean = the mean over directions of y (direction-major (K, b L, d)
    memory), out = mean * silu(z); z (b, L, d) with contiguous channels (the in-projection's second half)."""
    batch, seqlen, d_inner = z.shape
    out = torch.empty((batch, seqlen, d_inner), device=z.device, dtype=z.dtype)
    mean = torch.empty_like(out)
    grid = (triton.cdiv(d_inner, GATE_BLOCK_D), triton.cdiv(seqlen, GATE_BLOCK_T), batch)
    launch(_gate_fwd, grid, y, z, out, mean, z.stride(0), z.stride(1), seqlen, d_inner, num_dirs,
           BLOCK_T=GATE_BLOCK_T, BLOCK_D=GATE_BLOCK_D, num_warps=GATE_WARPS)
    return out, mean


def gate_backward(dout: torch.Tensor, mean: torch.Tensor, z: torch.Tensor, dz: torch.Tensor, num_dirs: int):
    """The gradient of every direction's y, dout silu(z) / K (b, L, d); writes dz = dout mean silu'(z) into dz (a
    view with contiguous channels, e.g. the second half of the in-projection's gradient)."""
    batch, seqlen, d_inner = z.shape
    dy = torch.empty_like(mean)
    grid = (triton.cdiv(d_inner, GATE_BLOCK_D), triton.cdiv(seqlen, GATE_BLOCK_T), batch)
    launch(_gate_bwd, grid, dout, mean, z, dy, dz, dout.stride(0), dout.stride(1), z.stride(0), z.stride(1),
           dz.stride(0), dz.stride(1), seqlen, d_inner, num_dirs, BLOCK_T=GATE_BLOCK_T, BLOCK_D=GATE_BLOCK_D,
           num_warps=GATE_WARPS)
    return dy
