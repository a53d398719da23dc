""" Selective scan in Triton, backward (the forward and the layout are in ``scan``).

The backward keeps nothing from the forward but its inputs. The forward kernel, on its own wide tiles, first
re-runs the recurrence and writes the state at every segment start (M chunks) to a scratch buffer that lives
only during this layer's backward. The backward kernel then walks the segments in reverse: re-runs the segment,
keeping its chunk starts in a few KiB per program that stay in L2, then walks its chunks in reverse, recomputes
each chunk's states and runs the adjoint
    lam_t = C_t y'_t + a_{t+1} lam_{t+1}        (a_t = exp(delta_t A); a_{t+1} of the chunk's last step kept from
                                                 the later chunk, which was processed just before)
as a reverse associative scan (a forward scan of the flipped chunk). With x_t = delta_t B_t u_t,
a_t h_{t-1} = h_t - x_t (no division):
    ddelta_t = sum_n lam_t ((h_t - x_t) A + u_t B_t),   du_t = delta_t sum_n lam_t B_t + D y'_t,
    dA = sum_{b,t} lam_t (h_t - x_t) delta_t,   dB_t = sum_c lam_t delta_t u_t,   dC_t = sum_c y'_t h_t.
Every loop loads the next chunk's inputs one iteration ahead (the kernels are latency-bound, not
arithmetic-bound). On the default (2, 16, 16) tile the channel sums of dB / dC are a lane reduce-scatter: each
thread sends half of what it holds per step instead of a butterfly's all-reduce (15 shuffles instead of 64).
Sums across programs (batch for dA / dD / dbias, channel blocks for dB / dC) are fp32 atomic adds in the kernel
(no partials written and summed: ARM-B's scan backward 7 % faster, 0.6 GiB less memory in training); where
PyTorch is asked for deterministic algorithms, per-program partials summed in PyTorch instead.

"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import ON_CUDA_COMPILER, has_register_cap, launch
from .scan import (
    ScanConfig,
    _chunk_loads,
    _combine,
    _delta,
    _delta_of,
    _scan_fwd_kernel,
    bkl_shape,
    bkl_strides,
    token_positions,
)
from .utils import cast, pow2

__all__ = ['scan_backward']

_LANE_SHUFFLE = tl.constexpr(ON_CUDA_COMPILER)  # inline PTX shuffles; the interpreter and ROCm exchange tensors


@triton.jit
def _keep_first(x0, x1):
    return x0


@triton.jit
def _keep_last(x0, x1):
    return x1


@triton.jit
def _step(x, offs_t, LAST: tl.constexpr, IN_REGS: tl.constexpr):
    """x (T, ...) at its first (or LAST) time step. Where time lies in each thread's registers, a register move
    (_keep_first / _keep_last are not commutative, so never for a reduction across lanes); else a masked sum."""
    if IN_REGS:
        if LAST:
            y = tl.reduce(x, 0, _keep_last)
        else:
            y = tl.reduce(x, 0, _keep_first)
    else:
        y = tl.sum(tl.where(offs_t[:, None, None] == (x.shape[0] - 1 if LAST else 0), x, 0.), axis=0)
    return y


@triton.jit
def _pick_hi(x0, c0, x1, c1):
    # over a pair (x0, x1) with the same flag c: x1 where c else x0
    return tl.where(c0 != 0, x1, x0), c0


@triton.jit
def _pick_lo(x0, c0, x1, c1):
    return tl.where(c0 != 0, x0, x1), c0


@triton.jit
def _channel_partner(x, MASK: tl.constexpr):
    """x of channel c ^ MASK (the last axis, 16 channels, is the lane index in the backward's tiles)."""
    if _LANE_SHUFFLE:  # one warp shuffle per value
        if MASK == 8:
            y = tl.inline_asm_elementwise('shfl.sync.bfly.b32 $0, $1, 8, 0x1f, -1;', '=f,f', [x],
                                          dtype=tl.float32, is_pure=True, pack=1)
        elif MASK == 4:
            y = tl.inline_asm_elementwise('shfl.sync.bfly.b32 $0, $1, 4, 0x1f, -1;', '=f,f', [x],
                                          dtype=tl.float32, is_pure=True, pack=1)
        elif MASK == 2:
            y = tl.inline_asm_elementwise('shfl.sync.bfly.b32 $0, $1, 2, 0x1f, -1;', '=f,f', [x],
                                          dtype=tl.float32, is_pure=True, pack=1)
        else:
            y = tl.inline_asm_elementwise('shfl.sync.bfly.b32 $0, $1, 1, 0x1f, -1;', '=f,f', [x],
                                          dtype=tl.float32, is_pure=True, pack=1)
    else:  # the same exchange in tensor terms (Triton's interpreter, ROCm)
        rows: tl.constexpr = x.numel // 16
        y = tl.reshape(tl.flip(tl.reshape(x, (rows, 8 // MASK, 2, MASK)), 2), x.shape)
    return y


@triton.jit
def _halve(x, d_bit):
    """One reduce-scatter step over the channel pairs (c, c ^ 2^d_bit) of x (2, ..., 16): the leading (in-thread)
    axis is split between the pair, so each lane sends half its values instead of all of them."""
    flag = tl.broadcast_to(((tl.arange(0, 16) >> d_bit) & 1).reshape([1] * (len(x.shape) - 1) + [16]), x.shape)
    keep, _ = tl.reduce((x, flag), 0, _pick_hi)
    send, _ = tl.reduce((x, flag), 0, _pick_lo)
    return keep + _channel_partner(send, 1 << d_bit)


@triton.jit
def _channel_sums(v):
    """sum_c v[t, n, c] of a (2, 16, 16) (time, state, channel) tile as a reduce-scatter: 15 shuffles per lane
    instead of a butterfly's 64. Returns s (2, 16) with s[j, c] = the sum at t = c >> 3 & 1,
    n = 8 (c >> 2 & 1) + 4 (c >> 1 & 1) + 2 (c & 1) + j (``_channel_sum_index``)."""
    v = tl.reshape(v, (2, 2, 2, 2, 2, 16))  # (t, n >> 3, n >> 2 & 1, n >> 1 & 1, n & 1, c)
    for i in tl.static_range(4):
        v = _halve(v, 3 - i)
    return v


@triton.jit
def _channel_sum_index():
    """(t, n) of every element of ``_channel_sums``' result, each (2, 16)."""
    c = tl.arange(0, 16)[None, :]
    n = 8 * ((c >> 2) & 1) + 4 * ((c >> 1) & 1) + 2 * (c & 1) + tl.arange(0, 2)[:, None]
    return tl.broadcast_to((c >> 3) & 1, (2, 16)), n


@triton.jit
def _chunk_loads_bwd(u_base, dt_base, B_base, C_base, dy_base, pos, mask_t, mask_d, mask_n, su_l, sdt_l, sB_l,
                     sC_l, sdy_l):
    """The backward's inputs of one chunk: u, delta, B, C and the output gradient, as stored."""
    u, raw, Bt = _chunk_loads(u_base, dt_base, B_base, pos, mask_t, mask_d, mask_n, su_l, sdt_l, sB_l)
    Ct = tl.load(C_base + pos[:, None] * sC_l, mask=mask_t[:, None] & mask_n[None, :], other=0.)
    g = tl.load(dy_base + pos[:, None] * sdy_l, mask=mask_t[:, None] & mask_d[None, :], other=0.)
    return u, raw, Bt, Ct, g


@triton.jit
def _chunk_end_state(h, u, raw, Bt, mask_t, mask_d, offs_t, A2, bias, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, LANE_TILE: tl.constexpr):
    """The state after a chunk (its loaded u, delta, B), from the state h before it."""
    dt, _ = _delta_of(raw, mask_t[:, None] & mask_d[None, :], bias, HAS_BIAS, SOFTPLUS)
    a = tl.exp2(dt[:, None, :] * A2[None, :, :])
    x = (dt * u.to(tl.float32))[:, None, :] * Bt.to(tl.float32)[:, :, None]
    x = tl.where(offs_t[:, None, None] == 0, x + a * h[None, :, :], x)
    _, hs = tl.associative_scan((a, x), 0, _combine)
    return _step(hs, offs_t, True, LANE_TILE)


@triton.jit
def _store_or_add(ptr, value, mask, ADD: tl.constexpr):
    if ADD:
        tl.atomic_add(ptr, value, mask=mask, sem='relaxed')
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _scan_bwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, order_ptr, dy_ptr, seg_ptr, loc_ptr,
        du_ptr, ddt_ptr, dparam_ptr, dBC_ptr,
        su_b, su_k, su_l, su_d, sdt_b, sdt_k, sdt_l, sdt_d,
        sB_b, sB_k, sB_l, sB_n, sC_b, sC_k, sC_l, sC_n, sdy_b, sdy_k, sdy_l, sdy_d,
        seqlen, d_inner, d_state,
        NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, M: tl.constexpr,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_ORDER: tl.constexpr,
        LANE_TILE: tl.constexpr, HAS_STATES: tl.constexpr, ATOMIC: tl.constexpr = False,
):
    pid_d, k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_blocks, num_dirs = tl.num_programs(0), tl.num_programs(1)
    num_segments = tl.cdiv(seqlen, T * M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_inner
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < d_state
    offs_t = tl.arange(0, T)
    row = k * d_inner + offs_d
    mask_nd = mask_n[:, None] & mask_d[None, :]

    A = tl.load(A_ptr + row[None, :] * d_state + offs_n[:, None], mask=mask_nd, other=0.).to(tl.float32)
    A2 = A * 1.4426950408889634
    Dv = tl.load(D_ptr + row, mask=mask_d & HAS_D, other=0.).to(tl.float32)
    bias = tl.load(bias_ptr + row, mask=mask_d & HAS_BIAS, other=0.).to(tl.float32)

    b64, k64 = b.to(tl.int64), k.to(tl.int64)
    bk = k64 * tl.num_programs(2) + b64  # outputs are direction-major: (K, b, ...)
    u_base = u_ptr + b64 * su_b + k64 * su_k + offs_d[None, :] * su_d
    dt_base = dt_ptr + b64 * sdt_b + k64 * sdt_k + offs_d[None, :] * sdt_d
    dy_base = dy_ptr + b64 * sdy_b + k64 * sdy_k + offs_d[None, :] * sdy_d
    B_base = B_ptr + b64 * sB_b + k64 * sB_k + offs_n[None, :] * sB_n
    C_base = C_ptr + b64 * sC_b + k64 * sC_k + offs_n[None, :] * sC_n
    out_base = bk * seqlen * d_inner + offs_d[None, :]  # du, ddelta: contiguous (K, b, L, d)
    # segment-start states (K, b, segments, NP, d), fp32, in HBM; the chunk starts of the segment at hand in
    # a small per-program scratch (K, b, blocks, M, NP, BLOCK_D) that stays in L2
    seg_base = seg_ptr + bk * num_segments * NP * d_inner + offs_n[:, None] * d_inner + offs_d[None, :]
    loc_base = loc_ptr + ((bk * num_blocks + pid_d) * M * NP + offs_n[:, None]) * BLOCK_D \
        + tl.arange(0, BLOCK_D)[None, :]
    # dB / dC side by side, fp32: summed over the channel blocks by atomic adds into (K, b, L, 2 NP) (ATOMIC),
    # else per-block partials (K, b, blocks, L, 2 NP)
    if ATOMIC:
        part_row = bk * seqlen * (2 * NP)
    else:
        part_row = ((bk * num_blocks + pid_d) * seqlen) * (2 * NP)
    if LANE_TILE:
        t_sum, n_sum = _channel_sum_index()
    first = offs_t[:, None, None] == 0
    last = offs_t[:, None, None] == T - 1

    # pass 1 (unless the forward kernel did it, HAS_STATES): re-run the recurrence, keeping the state at every
    # segment start. Every loop below loads the next chunk's inputs (and the positions of the one after) one
    # iteration ahead: a warp's loads are in flight while it computes, instead of stalling at each chunk.
    if not HAS_STATES:
        h = tl.zeros((NP, BLOCK_D), dtype=tl.float32)
        pos_n = token_positions(order_ptr, k, offs_t, seqlen, HAS_ORDER)
        u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, offs_t < seqlen, mask_d, mask_n, su_l,
                                       sdt_l, sB_l)
        pos_n = token_positions(order_ptr, k, T + offs_t, seqlen, HAS_ORDER)
        for c in range(num_segments * M):
            if c % M == 0:
                tl.store(seg_base + (c // M) * NP * d_inner, h, mask=mask_nd)
            u, raw, Bt = u_n, raw_n, B_n
            u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, (c + 1) * T + offs_t < seqlen,
                                           mask_d, mask_n, su_l, sdt_l, sB_l)
            pos_n = token_positions(order_ptr, k, (c + 2) * T + offs_t, seqlen, HAS_ORDER)
            h = _chunk_end_state(h, u, raw, Bt, c * T + offs_t < seqlen, mask_d, offs_t, A2, bias, HAS_BIAS,
                                 SOFTPLUS, LANE_TILE)
        tl.debug_barrier()  # the states written above are read back below, possibly by other threads

    # pass 2: segments in reverse; in each, the chunk starts, then the chunks in reverse
    lam_next = tl.zeros((NP, BLOCK_D), dtype=tl.float32)  # lam at the first step of the later chunk
    a_next = tl.full((NP, BLOCK_D), 1., dtype=tl.float32)  # and its decay (none after the last step)
    dA_acc = tl.zeros((NP, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # the chunks in reverse order, across segments: the last chunk's inputs and the positions before it
    c_last = num_segments * M - 1
    pos_b = token_positions(order_ptr, k, c_last * T + offs_t, seqlen, HAS_ORDER)
    u_b, raw_b, B_b, C_b, g_b = _chunk_loads_bwd(u_base, dt_base, B_base, C_base, dy_base, pos_b,
                                                 c_last * T + offs_t < seqlen, mask_d, mask_n, su_l, sdt_l,
                                                 sB_l, sC_l, sdy_l)
    pos_bn = token_positions(order_ptr, k, (c_last - 1) * T + offs_t, seqlen, HAS_ORDER)
    for si in range(num_segments):
        s = num_segments - 1 - si
        h = tl.load(seg_base + s * NP * d_inner, mask=mask_nd, other=0.)
        pos_n = token_positions(order_ptr, k, s * M * T + offs_t, seqlen, HAS_ORDER)
        u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, s * M * T + offs_t < seqlen, mask_d,
                                       mask_n, su_l, sdt_l, sB_l)
        pos_n = token_positions(order_ptr, k, (s * M + 1) * T + offs_t, seqlen, HAS_ORDER)
        for m in range(M):
            tl.store(loc_base + m * NP * BLOCK_D, h)
            c = s * M + m
            u, raw, Bt = u_n, raw_n, B_n
            if m + 1 < M:
                u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, (c + 1) * T + offs_t < seqlen,
                                               mask_d, mask_n, su_l, sdt_l, sB_l)
                pos_n = token_positions(order_ptr, k, (c + 2) * T + offs_t, seqlen, HAS_ORDER)
            h = _chunk_end_state(h, u, raw, Bt, c * T + offs_t < seqlen, mask_d, offs_t, A2, bias, HAS_BIAS,
                                 SOFTPLUS, LANE_TILE)
        tl.debug_barrier()
        for mi in range(M):
            m = M - 1 - mi
            c = s * M + m
            t = c * T + offs_t
            mask_t = t < seqlen
            mask = mask_t[:, None] & mask_d[None, :]
            pos, u, raw, Bt, Ct, g = pos_b, u_b, raw_b, B_b, C_b, g_b
            pos_b = pos_bn  # the chunk before (the last one prefetched is never used)
            u_b, raw_b, B_b, C_b, g_b = _chunk_loads_bwd(u_base, dt_base, B_base, C_base, dy_base, pos_b,
                                                         t - T < seqlen, mask_d, mask_n, su_l, sdt_l, sB_l,
                                                         sC_l, sdy_l)
            pos_bn = token_positions(order_ptr, k, t - 2 * T, seqlen, HAS_ORDER)
            u, Bt, Ct, g = u.to(tl.float32), Bt.to(tl.float32), Ct.to(tl.float32), g.to(tl.float32)
            dt, dt_raw = _delta_of(raw, mask, bias, HAS_BIAS, SOFTPLUS)

            # the chunk's states from its start
            h0 = tl.load(loc_base + m * NP * BLOCK_D)
            a = tl.exp2(dt[:, None, :] * A2[None, :, :])
            dtu = dt * u
            x = dtu[:, None, :] * Bt[:, :, None]
            _, hs = tl.associative_scan((a, tl.where(first, x + a * h0[None, :, :], x)), 0, _combine)

            # adjoint, the chunk's last step taking the later chunk's lam; a1 = the decay one step later: this
            # chunk's next step, or the later chunk's first (time is in-thread: register moves, no shuffles)
            if T == 2:
                a1 = tl.where(first, _step(a, offs_t, True, LANE_TILE)[None, :, :], a_next[None, :, :])
                a_next = _step(a, offs_t, False, LANE_TILE)
            else:  # recomputed from delta one step later
                pos1 = token_positions(order_ptr, k, t + 1, seqlen, HAS_ORDER)
                dt1, _ = _delta(dt_base, pos1, sdt_l, (t + 1 < seqlen)[:, None] & mask_d[None, :], bias,
                                HAS_BIAS, SOFTPLUS)
                a1 = tl.exp2(dt1[:, None, :] * A2[None, :, :])
            beta = g[:, None, :] * Ct[:, :, None]
            beta = tl.where(last, beta + a1 * lam_next[None, :, :], beta)
            # a reverse scan, as a forward scan of the flipped chunk: time lies in each thread's registers, so
            # the flips are free (tl.associative_scan(reverse=True) shuffles across lanes)
            _, lam = tl.associative_scan((tl.flip(a1, 0), tl.flip(beta, 0)), 0, _combine)
            lam = tl.flip(lam, 0)
            lam_next = _step(lam, offs_t, False, LANE_TILE)

            lam_h = lam * (hs - x)  # lam_t a_t h_{t-1}
            lam_B = tl.sum(lam * Bt[:, :, None], axis=1)  # (T, BLOCK_D)
            ddt = tl.sum(lam_h * A[None, :, :], axis=1) + u * lam_B
            du = dt * lam_B
            if HAS_D:
                du += Dv[None, :] * g
                dD_acc += tl.sum(g * u, axis=0)
            dA_acc += tl.sum(lam_h * dt[:, None, :], axis=0)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(mask, ddt, 0.)
            dbias_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + out_base + pos[:, None] * d_inner, du.to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(ddt_ptr + out_base + pos[:, None] * d_inner, ddt.to(ddt_ptr.dtype.element_ty), mask=mask)

            # masked channels have dt = 0 and g = 0
            if LANE_TILE:
                dB = _channel_sums(lam * dtu[:, None, :])
                dC = _channel_sums(hs * g[:, None, :])
                t_s = (s * M + m) * T + t_sum
                pos_s = token_positions(order_ptr, k, t_s, seqlen, HAS_ORDER)
                part = dBC_ptr + part_row + pos_s * (2 * NP) + n_sum
                _store_or_add(part, dB, t_s < seqlen, ATOMIC)
                _store_or_add(part + NP, dC, t_s < seqlen, ATOMIC)
            else:
                dB = tl.sum(lam * dtu[:, None, :], axis=2)  # (T, NP)
                dC = tl.sum(hs * g[:, None, :], axis=2)
                part = dBC_ptr + part_row + pos[:, None] * (2 * NP) + offs_n[None, :]
                _store_or_add(part, dB, mask_t[:, None], ATOMIC)
                _store_or_add(part + NP, dC, mask_t[:, None], ATOMIC)
        tl.debug_barrier()  # the next segment overwrites the chunk starts

    # dA, dD, dbias in the parameters' layouts, one after the other: (K d N | K d | K d) fp32, summed over the
    # batch by atomic adds (ATOMIC), else one such row per image (dA times A, the gradient of A_log, is taken
    # outside: A kept live to the end cost the kernel registers it has none to spare for)
    kd = num_dirs * d_inner
    param_base = dparam_ptr
    if not ATOMIC:
        param_base += b64 * kd * (d_state + 2)
    _store_or_add(param_base + row[None, :] * d_state + offs_n[:, None], dA_acc, mask_nd, ATOMIC)
    if HAS_D:
        _store_or_add(param_base + kd * d_state + row, dD_acc, mask_d, ATOMIC)
    if HAS_BIAS:
        _store_or_add(param_base + kd * (d_state + 1) + row, dbias_acc, mask_d, ATOMIC)


def _lane_tile(cfg: ScanConfig, np_: int) -> bool:
    """Whether the backward's tile is (2, 16, 16) (time, state, channel) on one warp, which Triton lays out with
    channels on lane bits 0-3, state bit 0 on lane bit 4, and the time step and state bits 1-3 in each thread's
    registers (checked in tests/test_triton_kernels.py). The backward then picks time steps with register moves
    and sums dB / dC as a lane reduce-scatter (``_channel_sums``)."""
    return (cfg.T_bwd, cfg.block_d_bwd, np_, cfg.warps_bwd) == (2, 16, 16, 1)


def scan_backward(dy, u, delta, A, B, C, D, delta_bias, softplus, order, cfg: ScanConfig, a_is_log: bool = False,
                  batch: Optional[int] = None):
    """(du, ddelta, dA, dB, dC, dD, dbias); with a_is_log, A holds A_log and dA is the gradient of A_log. With
    ``batch``, u, delta, B, C are direction-major (K, b L, c) tensors (dy a (b, K, L, d) view) and du, ddelta, dB, dC
    come back in that layout; else all are (b, K, L, c)."""
    batch_in = batch
    batch, num_dirs, seqlen, d_inner = bkl_shape(u, batch)
    d_state = A.shape[-1]
    np_ = pow2(d_state)
    num_blocks = triton.cdiv(d_inner, cfg.block_d_bwd)
    num_segments = triton.cdiv(seqlen, cfg.T_bwd * cfg.chunks_per_segment)
    dev, f32 = u.device, torch.float32
    segments = torch.empty((num_dirs, batch, num_segments, np_, d_inner), device=dev, dtype=f32)
    chunk_starts = torch.empty((num_dirs, batch, num_blocks, cfg.chunks_per_segment, np_, cfg.block_d_bwd),
                               device=dev, dtype=f32)
    # direction-major outputs, returned as (b, K, ...) views
    du = torch.empty((num_dirs, batch, seqlen, d_inner), device=dev, dtype=u.dtype)
    ddelta = torch.empty((num_dirs, batch, seqlen, d_inner), device=dev, dtype=delta.dtype)
    # dB | dC (K, b, L, 2 NP) and dA | dD | dbias (K d (N + 2)), fp32: the sums over channel blocks and over the
    # batch added up in the kernel, in one zeroed buffer (atomics: the order of the additions varies), or, where
    # PyTorch is asked for deterministic algorithms, per-block / per-image partials summed below
    atomic = not torch.are_deterministic_algorithms_enabled()
    kd = num_dirs * d_inner
    if atomic:
        sums = torch.zeros(num_dirs * batch * seqlen * 2 * np_ + kd * (d_state + 2), device=dev, dtype=f32)
        dBC = sums[:num_dirs * batch * seqlen * 2 * np_].view(num_dirs, batch, seqlen, 2 * np_)
        dparams = sums[dBC.numel():].view(1, -1)
    else:
        dBC = torch.empty((num_dirs, batch, num_blocks, seqlen, 2 * np_), device=dev, dtype=f32)
        dparams = torch.empty((batch, kd * (d_state + 2)), device=dev, dtype=f32)
    segment_steps = cfg.T_bwd * cfg.chunks_per_segment
    has_states = cfg.states_in_forward_kernel and segment_steps % cfg.T == 0
    if has_states:  # the backward's first pass (a forward sweep) on the forward's wider tiles
        grid = (triton.cdiv(d_inner, cfg.block_d_fwd), num_dirs, batch)
        launch(
            _scan_fwd_kernel, grid, u, delta, A, B, C, A, delta_bias if delta_bias is not None else A,
            order if order is not None else A, segments, *bkl_strides(u, batch_in), *bkl_strides(delta, batch_in),
            *bkl_strides(B, batch_in), *bkl_strides(C, batch_in), seqlen, d_inner, d_state, NP=np_,
            BLOCK_D=cfg.block_d_fwd, T=cfg.T, HAS_D=False, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_ORDER=order is not None, SEGMENT_CHUNKS=segment_steps // cfg.T,
            A_IS_LOG=a_is_log, num_warps=cfg.warps_fwd)
    # the backward kernel takes A itself: computing it from A_log in there took registers it has none to spare for
    # (the kernel ran 28 % slower in an ARM-B training step on an H200)
    if a_is_log:
        A = -torch.exp(A)
    grid = (num_blocks, num_dirs, batch)
    launch(
        _scan_bwd_kernel, grid, u, delta, A, B, C, D if D is not None else A,
        delta_bias if delta_bias is not None else A, order if order is not None else A, dy, segments, chunk_starts,
        du, ddelta, dparams, dBC, *bkl_strides(u, batch_in), *bkl_strides(delta, batch_in),
        *bkl_strides(B, batch_in), *bkl_strides(C, batch_in), *dy.stride(), seqlen, d_inner, d_state, NP=np_,
        BLOCK_D=cfg.block_d_bwd, T=cfg.T_bwd, M=cfg.chunks_per_segment, HAS_D=D is not None,
        LANE_TILE=_lane_tile(cfg, np_), HAS_STATES=has_states, ATOMIC=atomic,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_ORDER=order is not None, num_warps=cfg.warps_bwd,
        **({'maxnreg': cfg.max_registers_bwd} if cfg.max_registers_bwd and has_register_cap() else {}))
    dparams = dparams[0] if atomic else dparams.sum(0)  # one reduction over the batch for dA, dD and dbias
    dA = dparams[:kd * d_state].view(A.shape)
    if a_is_log:  # d A / d A_log = A
        dA = dA * A
    dD = cast(dparams[kd * d_state:kd * (d_state + 1)].view(D.shape), D.dtype) if D is not None else None
    dbias = cast(dparams[kd * (d_state + 1):].view(delta_bias.shape), delta_bias.dtype) if delta_bias is not None \
        else None
    # one cast for dB and dC (after one reduction over the channel blocks): (K, b, L, [dB | dC]) in B's dtype
    dBC = cast(dBC if atomic else dBC.sum(2), B.dtype)
    if batch_in is not None:
        dBC = dBC.view(num_dirs, batch * seqlen, 2 * np_)
        return (du.view(num_dirs, -1, d_inner), ddelta.view(num_dirs, -1, d_inner), dA, dBC[..., :d_state],
                dBC[..., np_:np_ + d_state], dD, dbias)
    dB, dC = dBC[..., :d_state].transpose(0, 1), dBC[..., np_:np_ + d_state].transpose(0, 1)
    return du.transpose(0, 1), ddelta.transpose(0, 1), dA, dB, dC, dD, dbias
