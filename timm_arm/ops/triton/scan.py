""" Selective scan in Triton, forward (the backward is ``scan_backward``), made for vision-length sequences
(L <= ~1024) and for several scan directions over one token sequence.

Token-major layout: activations are (b, K, L, d) -- batch, scan direction, token, channel -- with channels
contiguous, exactly as the projections around the mixer produce them, so nothing is transposed. A direction's
scan order is a row of ``order`` (K, L): step t of direction k reads and writes token ``order[k, t]``. Flips and
grid transposes are therefore index arithmetic inside the kernels; no permuted copy is ever made. The host functions
also take direction-major (K, b L, c) tensors (``batch`` given): the mixer's projections are K batched matmuls.

Per direction k, channel c, along k's order (the semantics of ``timm_arm.ops.selective_scan_torch``):
    delta = softplus(delta + delta_bias);  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = <h_t, C_t> + D u_t
One program owns BLOCK_D channels x N states of one (image, direction) and walks the sequence in chunks of T
steps: (T, N, BLOCK_D) register tiles, tl.associative_scan along T, the chunk's first step taking the carried
state. The state is fp32 throughout; inputs may be bf16 or fp32. Every loop loads the next chunk's inputs one
iteration ahead (the kernels are latency-bound, not arithmetic-bound).
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .launch import ON_CUDA_COMPILER, launch
from .utils import pow2

__all__ = ['ScanConfig', 'scan_config', 'scan_forward', 'bkl_shape', 'bkl_strides', 'token_positions']

_fast_log2 = None
if ON_CUDA_COMPILER:
    try:  # lg2.approx (one MUFU op) instead of libm's polynomial log in softplus
        from triton.language.extra.cuda.libdevice import fast_log2f as _fast_log2
    except ImportError:  # pragma: no cover - older triton: the portable log
        pass
_FAST_LOG2 = tl.constexpr(_fast_log2 is not None)


class ScanConfig(NamedTuple):
    T: int  # forward: time steps per chunk (power of two)
    block_d_fwd: int  # forward: channels per program
    warps_fwd: int
    T_bwd: int  # backward: time steps per chunk (power of two)
    block_d_bwd: int
    warps_bwd: int
    chunks_per_segment: int = 4  # backward: the state is kept in HBM at every segment start only
    max_registers_bwd: Optional[int] = None  # backward: register cap per thread (more warps per SM, may spill)
    # backward: segment-start states from the forward kernel's tiles (where T_bwd * chunks_per_segment is a
    # multiple of T; else the backward kernel's own first pass)
    states_in_forward_kernel: bool = True


def scan_config(d_inner: int, seqlen: int, d_state: int) -> ScanConfig:
    """Tile sizes: channels across lanes, T steps x N states in each thread's registers.

    Swept on an H200 at ARM-B's and ARM-L's training shapes (b 128 / 64, 4 directions, L 197, d 768 / 1024, N 16,
    bf16): forward best at T 4, 64 channels, 1 warp; backward at T 2, 16 channels, 1 warp (the lane tile:
    reduce-scatter channel sums), capped at 176 registers (168 used, no spills; at 128 it spills, and 12 warps per SM
    beat 16), segments of 4 chunks, the segment states written by the forward kernel on its own tiles.
    """
    T = min(4, max(2, pow2(seqlen)))
    return ScanConfig(T, min(64, pow2(d_inner)), 1, 2, min(16, pow2(d_inner)), 1, 4, 176)


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _log2(x):
    if _FAST_LOG2:
        return _fast_log2(x)
    else:  # Triton's interpreter, ROCm
        return tl.log2(x)


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log(1 + e^-|x|): no overflow
    return tl.maximum(x, 0.) + _log2(1. + tl.exp2(tl.abs(x) * -1.4426950408889634)) * 0.6931471805599453


@triton.jit
def token_positions(order_ptr, k, t, seqlen, HAS_ORDER: tl.constexpr):
    """Token index of scan steps t of direction k (int64; 0 where t is out of range)."""
    if HAS_ORDER:
        pos = tl.load(order_ptr + k * seqlen + t, mask=(t >= 0) & (t < seqlen), other=0)
    else:
        pos = tl.where((t >= 0) & (t < seqlen), t, 0)
    return pos.to(tl.int64)


@triton.jit
def _delta_of(raw, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Discretisation step for a (T, BLOCK_D) tile of loaded delta: softplus(delta + bias), 0 where masked.
    Also returns the pre-softplus value (for the backward)."""
    raw = raw.to(tl.float32)
    if HAS_BIAS:
        raw += bias[None, :]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return tl.where(mask, dt, 0.), raw  # padded steps: decay 1, input 0


@triton.jit
def _delta(dt_base, pos, stride_l, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    raw = tl.load(dt_base + pos[:, None] * stride_l, mask=mask, other=0.)
    return _delta_of(raw, mask, bias, HAS_BIAS, SOFTPLUS)


@triton.jit
def _load_A(A_ptr, row, offs_n, mask, d_state, A_IS_LOG: tl.constexpr):
    """A (NP, BLOCK_D) fp32; from A_log (A = -exp(A_log), as the mixer stores it) where A_IS_LOG."""
    A = tl.load(A_ptr + row[None, :] * d_state + offs_n[:, None], mask=mask, other=0.).to(tl.float32)
    if A_IS_LOG:
        A = tl.where(mask, -tl.exp(A), 0.)
    return A


@triton.jit
def _chunk_loads(u_base, dt_base, B_base, pos, mask_t, mask_d, mask_n, su_l, sdt_l, sB_l):
    """u, delta (before bias) and B of one chunk at token positions pos, as stored."""
    mask = mask_t[:, None] & mask_d[None, :]
    u = tl.load(u_base + pos[:, None] * su_l, mask=mask, other=0.)
    raw = tl.load(dt_base + pos[:, None] * sdt_l, mask=mask, other=0.)
    Bt = tl.load(B_base + pos[:, None] * sB_l, mask=mask_t[:, None] & mask_n[None, :], other=0.)
    return u, raw, Bt


@triton.jit
def _scan_fwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, order_ptr, y_ptr,
        su_b, su_k, su_l, su_d, sdt_b, sdt_k, sdt_l, sdt_d,
        sB_b, sB_k, sB_l, sB_n, sC_b, sC_k, sC_l, sC_n,
        seqlen, d_inner, d_state,
        NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_ORDER: tl.constexpr,
        SEGMENT_CHUNKS: tl.constexpr = 0, A_IS_LOG: tl.constexpr = False,
):
    """y (K, b, L, d); or, with SEGMENT_CHUNKS, no y but the state at every segment start (every SEGMENT_CHUNKS
    chunks) into y_ptr as (K, b, segments, NP, d) fp32: the backward's first pass."""
    pid_d, k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_inner
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < d_state
    offs_t = tl.arange(0, T)
    row = k * d_inner + offs_d  # channel row of the (K * d) stacked parameters

    # exp(delta A) = exp2(delta A log2 e)
    A2 = _load_A(A_ptr, row, offs_n, mask_n[:, None] & mask_d[None, :], d_state, A_IS_LOG) * 1.4426950408889634
    Dv = tl.load(D_ptr + row, mask=mask_d & HAS_D, other=0.).to(tl.float32)
    bias = tl.load(bias_ptr + row, mask=mask_d & HAS_BIAS, other=0.).to(tl.float32)

    b64, k64 = b.to(tl.int64), k.to(tl.int64)
    u_base = u_ptr + b64 * su_b + k64 * su_k + offs_d[None, :] * su_d
    dt_base = dt_ptr + b64 * sdt_b + k64 * sdt_k + offs_d[None, :] * sdt_d
    B_base = B_ptr + b64 * sB_b + k64 * sB_k + offs_n[None, :] * sB_n
    C_base = C_ptr + b64 * sC_b + k64 * sC_k + offs_n[None, :] * sC_n
    y_base = y_ptr + (k64 * tl.num_programs(2) + b64) * seqlen * d_inner + offs_d[None, :]  # (K, b, L, d)
    num_segments = tl.cdiv(seqlen, T * SEGMENT_CHUNKS) if SEGMENT_CHUNKS > 0 else 0
    seg_base = y_ptr + (k64 * tl.num_programs(2) + b64) * num_segments * NP * d_inner \
        + offs_n[:, None] * d_inner + offs_d[None, :]

    h = tl.zeros((NP, BLOCK_D), dtype=tl.float32)
    # each chunk's inputs are loaded one iteration ahead (and its positions two), as in the backward
    pos_n = token_positions(order_ptr, k, offs_t, seqlen, HAS_ORDER)
    u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, offs_t < seqlen, mask_d, mask_n, su_l, sdt_l,
                                   sB_l)
    if SEGMENT_CHUNKS == 0:
        C_n = tl.load(C_base + pos_n[:, None] * sC_l, mask=(offs_t < seqlen)[:, None] & mask_n[None, :],
                      other=0.)
    pos_nn = token_positions(order_ptr, k, T + offs_t, seqlen, HAS_ORDER)
    for c in range(tl.cdiv(seqlen, T)):
        if SEGMENT_CHUNKS > 0:
            if c % SEGMENT_CHUNKS == 0:
                tl.store(seg_base + (c // SEGMENT_CHUNKS) * NP * d_inner, h,
                         mask=mask_n[:, None] & mask_d[None, :])
        t = c * T + offs_t
        mask_t = t < seqlen
        mask = mask_t[:, None] & mask_d[None, :]
        pos, u, raw, Bt = pos_n, u_n.to(tl.float32), raw_n, B_n.to(tl.float32)
        if SEGMENT_CHUNKS == 0:
            Ct = C_n.to(tl.float32)
        pos_n, mask_t1 = pos_nn, t + T < seqlen
        u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, mask_t1, mask_d, mask_n, su_l, sdt_l, sB_l)
        if SEGMENT_CHUNKS == 0:
            C_n = tl.load(C_base + pos_n[:, None] * sC_l, mask=mask_t1[:, None] & mask_n[None, :], other=0.)
        pos_nn = token_positions(order_ptr, k, t + 2 * T, seqlen, HAS_ORDER)
        dt, _ = _delta_of(raw, mask, bias, HAS_BIAS, SOFTPLUS)

        a = tl.exp2(dt[:, None, :] * A2[None, :, :])  # (T, NP, BLOCK_D)
        x = (dt * u)[:, None, :] * Bt[:, :, None]
        # the chunk's first step takes the carried state: h_0 = a_0 h_prev + x_0
        x = tl.where(offs_t[:, None, None] == 0, x + a * h[None, :, :], x)
        _, hs = tl.associative_scan((a, x), 0, _combine)
        h = tl.sum(tl.where(offs_t[:, None, None] == T - 1, hs, 0.), axis=0)

        if SEGMENT_CHUNKS == 0:
            y = tl.sum(hs * Ct[:, :, None], axis=1)  # (T, BLOCK_D)
            if HAS_D:
                y += Dv[None, :] * u
            tl.store(y_base + pos[:, None] * d_inner, y.to(y_ptr.dtype.element_ty), mask=mask)


def bkl_shape(u: torch.Tensor, batch: Optional[int]):
    """(b, K, L, d) of u: a (b, K, L, d) tensor, or with ``batch``, a direction-major (K, b L, d) one."""
    if batch is None:
        return u.shape
    return batch, u.shape[0], u.shape[1] // batch, u.shape[2]


def bkl_strides(t: torch.Tensor, batch: Optional[int]):
    """The (b, K, L, c) strides the kernels take: t's own, or with ``batch``, those of the (b, K, L, c) view of a
    (K, b L, c) tensor (arithmetic instead of view ops: host time per layer counts at ARM-L's size)."""
    if batch is None:
        return t.stride()
    s_k, s_row, s_c = t.stride()
    return t.shape[1] // batch * s_row, s_k, s_row, s_c


def scan_forward(u, delta, A, B, C, D, delta_bias, softplus, order, cfg: ScanConfig, a_is_log: bool = False,
                 batch: Optional[int] = None):
    """y, direction-major (K, b, L, d) memory: its (b, K, L, d) view, or with ``batch`` (inputs given as (K, b L, c)
    tensors) the (K, b L, d) tensor. a_is_log: A holds A_log (A = -exp(A_log))."""
    batch_, num_dirs, seqlen, d_inner = bkl_shape(u, batch)
    d_state = A.shape[-1]
    y = torch.empty((num_dirs, batch_ * seqlen, d_inner), device=u.device, dtype=u.dtype)
    grid = (triton.cdiv(d_inner, cfg.block_d_fwd), num_dirs, batch_)
    launch(
        _scan_fwd_kernel, grid, u, delta, A, B, C, D if D is not None else A,
        delta_bias if delta_bias is not None else A,
        order if order is not None else A, y, *bkl_strides(u, batch), *bkl_strides(delta, batch),
        *bkl_strides(B, batch), *bkl_strides(C, batch), seqlen, d_inner, d_state,
        NP=pow2(d_state), BLOCK_D=cfg.block_d_fwd, T=cfg.T, HAS_D=D is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_ORDER=order is not None, A_IS_LOG=a_is_log,
        num_warps=cfg.warps_fwd)
    return y if batch is not None else y.view(num_dirs, batch_, seqlen, d_inner).transpose(0, 1)
