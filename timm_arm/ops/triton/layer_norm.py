""" A block's residual add and the LayerNorm after it as one Triton kernel (forward only): the sum and the normed
output in one pass over memory, the latter in the dtype the next Linear reads (no cast kernel)."""
import torch
import triton
import triton.language as tl

from .launch import launch
from .utils import pow2

__all__ = ['add_layer_norm_forward', 'MAX_COLS']

MAX_COLS = 16384  # a row lives in one program's registers


@triton.jit
def _add_layer_norm_fwd(res_ptr, branch_ptr, w_ptr, b_ptr, total_ptr, out_ptr, mean_ptr, rstd_ptr, rows, cols,
                        eps, HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """total = residual + branch (in total's dtype), out = LayerNorm(total) in out's dtype, and the row
    statistics PyTorch's LayerNorm backward takes (mean, 1 / sqrt(var + eps)); rows of BLOCK_C >= cols."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    offs = r.to(tl.int64)[:, None] * cols + c[None, :]
    x = tl.load(res_ptr + offs, mask=mask, other=0.).to(tl.float32)
    if HAS_BRANCH:
        total = (x + tl.load(branch_ptr + offs, mask=mask, other=0.).to(tl.float32)).to(total_ptr.dtype.element_ty)
        tl.store(total_ptr + offs, total, mask=mask)
        x = total.to(tl.float32)  # normalise the sum as stored (rounded, if total is not fp32)
    mean = tl.sum(x, axis=1) / cols
    xc = tl.where(mask, x - mean[:, None], 0.)
    rstd = 1. / tl.sqrt(tl.sum(xc * xc, axis=1) / cols + eps)
    y = xc * rstd[:, None] * tl.load(w_ptr + c, mask=c < cols, other=0.).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=c < cols, other=0.).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + r, mean, mask=r < rows)
    tl.store(rstd_ptr + r, rstd, mask=r < rows)


def add_layer_norm_forward(residual, branch, weight, bias, eps, out_dtype):
    """Launch the fused kernel: (total, normed output, (2, ..., 1) fp32 mean / rstd). total is residual itself
    without a branch."""
    cols = residual.shape[-1]
    res = residual.contiguous()
    total = torch.empty_like(res, dtype=torch.promote_types(res.dtype, branch.dtype)) if branch is not None else res
    out = torch.empty_like(res, dtype=out_dtype)
    stats = torch.empty((2, *res.shape[:-1], 1), device=res.device, dtype=torch.float32)
    rows = res.numel() // cols
    block_c = pow2(cols)
    block_r = max(1, 4096 // block_c)
    launch(
        _add_layer_norm_fwd, (triton.cdiv(rows, block_r),), res, branch.contiguous() if branch is not None else res,
        weight, bias if bias is not None else weight,
        total, out, stats[0], stats[1], rows, cols, eps, HAS_BRANCH=branch is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_c >= 4096 else 4)
    return total, out, stats
