""" Selective scan and causal conv in Triton, forward and backward, made for vision-length sequences (L <= ~1024)
and for several scan directions over one token sequence.

Token-major layout: activations are (b, K, L, d) -- batch, scan direction, token, channel -- with channels
contiguous, exactly as the projections around the mixer produce them, so nothing is transposed. A direction's
scan order is a row of ``order`` (K, L): step t of direction k reads and writes token ``order[k, t]``. Flips and
grid transposes are therefore index arithmetic inside the kernels; no permuted copy is ever made.

Scan (same semantics as ``selective_scan_torch``, per direction k, channel c, along k's order):
    delta = softplus(delta + delta_bias);  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = <h_t, C_t> + D u_t
One program owns BLOCK_D channels x N states of one (image, direction) and walks the sequence in chunks of T
steps: (T, N, BLOCK_D) register tiles, tl.associative_scan along T, the chunk's first step taking the carried
state. The state is fp32 throughout; inputs may be bf16 or fp32.

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

Conv: u[k, order[k, t]] = silu(bias_k + sum_j w_kj x[order[k, t - W + 1 + j]]) (zero before the first step),
read straight from the in-projection's output. A program walks a run of steps of one (image, direction),
keeping the last W - 1 inputs in registers: every input row is read once, not once per tap. Its backward
(recomputing the pre-activation the same way) writes d(pre-activation) in scan order, then sums, for every token,
the contributions of all K directions into one dx.

LayerNorm: a block's residual add and LayerNorm as one kernel, the normed output written in the dtype the next
Linear reads (no cast kernel); PyTorch's LayerNorm backward.

SwiGLU: silu(gate) * value of the two halves of the MLP's one fc1 GEMM output, read in place; one elementwise
kernel forward, one backward writing both halves' gradients as one tensor.
"""
import inspect
import os
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
    has_triton = True
except ImportError:  # pragma: no cover - the package works without triton, this backend does not
    triton = tl = None
    has_triton = False

_fast_log2 = None
_on_cuda_compiler = has_triton and os.environ.get('TRITON_INTERPRET') != '1' and torch.version.hip is None
if _on_cuda_compiler:
    try:  # lg2.approx (one MUFU op) instead of libm's polynomial log in softplus
        from triton.language.extra.cuda.libdevice import fast_log2f as _fast_log2
    except ImportError:  # pragma: no cover - older triton: the portable log
        pass

__all__ = [
    'add_layer_norm_triton', 'swiglu_mlp_triton', 'mixer_tokens', 'selective_scan_triton', 'selective_scan_tokens',
    'causal_conv1d_silu_tokens', 'mixer_core_tokens', 'has_triton', 'ScanConfig',
    'scan_config']


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


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def scan_config(d_inner: int, seqlen: int, d_state: int) -> ScanConfig:
    """Tile sizes: channels across lanes, T steps x N states in each thread's registers.

    Swept on an H200 at ARM-B's and ARM-L's training shapes (b 128 / 64, 4 directions, L 197, d 768 / 1024, N 16,
    bf16; benchmarks/scan_kernels.py --sweep and benchmarks/results/h200_2026-11-27_scan_bwd_ab*.json): forward
    best at T 4, 64 channels, 1 warp; backward at T 2, 16 channels, 1 warp (the lane tile: reduce-scatter channel
    sums), capped at 176 registers (168 used, no spills; 128 spills, 12 warps per SM beat 16), segments of 4 chunks,
    the segment states written by the forward kernel on its own tiles (3.77 / 2.67 ms at ARM-B / ARM-L).
    """
    T = min(4, max(2, _pow2(seqlen)))
    return ScanConfig(T, min(64, _pow2(d_inner)), 1, 2, min(16, _pow2(d_inner)), 1, 4, 176)


if has_triton:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
        return a1 * a2, a2 * b1 + b2

    _FAST_LOG2 = tl.constexpr(_fast_log2 is not None)
    _LANE_SHUFFLE = tl.constexpr(_on_cuda_compiler)

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
    def _positions(order_ptr, k, t, seqlen, HAS_ORDER: tl.constexpr):
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
        pos_n = _positions(order_ptr, k, offs_t, seqlen, HAS_ORDER)
        u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, offs_t < seqlen, mask_d, mask_n, su_l, sdt_l,
                                       sB_l)
        if SEGMENT_CHUNKS == 0:
            C_n = tl.load(C_base + pos_n[:, None] * sC_l, mask=(offs_t < seqlen)[:, None] & mask_n[None, :],
                          other=0.)
        pos_nn = _positions(order_ptr, k, T + offs_t, seqlen, HAS_ORDER)
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
            pos_nn = _positions(order_ptr, k, t + 2 * T, seqlen, HAS_ORDER)
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
            pos_n = _positions(order_ptr, k, offs_t, seqlen, HAS_ORDER)
            u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, offs_t < seqlen, mask_d, mask_n, su_l,
                                           sdt_l, sB_l)
            pos_n = _positions(order_ptr, k, T + offs_t, seqlen, HAS_ORDER)
            for c in range(num_segments * M):
                if c % M == 0:
                    tl.store(seg_base + (c // M) * NP * d_inner, h, mask=mask_nd)
                u, raw, Bt = u_n, raw_n, B_n
                u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, (c + 1) * T + offs_t < seqlen,
                                               mask_d, mask_n, su_l, sdt_l, sB_l)
                pos_n = _positions(order_ptr, k, (c + 2) * T + offs_t, seqlen, HAS_ORDER)
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
        pos_b = _positions(order_ptr, k, c_last * T + offs_t, seqlen, HAS_ORDER)
        u_b, raw_b, B_b, C_b, g_b = _chunk_loads_bwd(u_base, dt_base, B_base, C_base, dy_base, pos_b,
                                                     c_last * T + offs_t < seqlen, mask_d, mask_n, su_l, sdt_l,
                                                     sB_l, sC_l, sdy_l)
        pos_bn = _positions(order_ptr, k, (c_last - 1) * T + offs_t, seqlen, HAS_ORDER)
        for si in range(num_segments):
            s = num_segments - 1 - si
            h = tl.load(seg_base + s * NP * d_inner, mask=mask_nd, other=0.)
            pos_n = _positions(order_ptr, k, s * M * T + offs_t, seqlen, HAS_ORDER)
            u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, s * M * T + offs_t < seqlen, mask_d,
                                           mask_n, su_l, sdt_l, sB_l)
            pos_n = _positions(order_ptr, k, (s * M + 1) * T + offs_t, seqlen, HAS_ORDER)
            for m in range(M):
                tl.store(loc_base + m * NP * BLOCK_D, h)
                c = s * M + m
                u, raw, Bt = u_n, raw_n, B_n
                if m + 1 < M:
                    u_n, raw_n, B_n = _chunk_loads(u_base, dt_base, B_base, pos_n, (c + 1) * T + offs_t < seqlen,
                                                   mask_d, mask_n, su_l, sdt_l, sB_l)
                    pos_n = _positions(order_ptr, k, (c + 2) * T + offs_t, seqlen, HAS_ORDER)
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
                pos_bn = _positions(order_ptr, k, t - 2 * T, seqlen, HAS_ORDER)
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
                    pos1 = _positions(order_ptr, k, t + 1, seqlen, HAS_ORDER)
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
                    pos_s = _positions(order_ptr, k, t_s, seqlen, HAS_ORDER)
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

    @triton.jit
    def _conv_row(x_base, order_ptr, k, t, seqlen, sx_l, mask_d, HAS_ORDER: tl.constexpr):
        """x at scan step t of direction k, (BLOCK_D,) as stored; zero outside 0 <= t < seqlen."""
        return _row_at(x_base, _positions(order_ptr, k, t, seqlen, HAS_ORDER), t, seqlen, sx_l, mask_d)

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
        pos_nn = _positions(order_ptr, k, t0 + 1, seqlen, HAS_ORDER)
        for i in range(tl.minimum(STEPS, seqlen - t0)):
            x0, pos = x_n.to(tl.float32), pos_n
            x_n, pos_n = _row_at(x_base, pos_nn, t0 + i + 1, seqlen, sx_l, mask_d)
            pos_nn = _positions(order_ptr, k, t0 + i + 2, seqlen, HAS_ORDER)
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
        pos_nn = _positions(order_ptr, k, t0 + 1, seqlen, HAS_ORDER)
        for i in range(tl.minimum(STEPS, seqlen - t0)):
            t = t0 + i
            x0, g = x_n.to(tl.float32), g_n.to(tl.float32)
            x_n, _ = _row_at(x_base, pos_nn, t + 1, seqlen, sx_l, mask_d)  # as in the forward
            g_n, _ = _row_at(du_base, pos_nn, t + 1, seqlen, sdu_l, mask_d)
            pos_nn = _positions(order_ptr, k, t + 2, seqlen, HAS_ORDER)
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
            s = _positions(inverse_ptr, k, p, seqlen, HAS_ORDER)  # the scan step at which direction k reads p
            dpre_base = dpre_ptr + (k * tl.num_programs(2) + b.to(tl.int64)) * seqlen * d_inner + offs_d[None, :]
            row = k * d_inner + offs_d
            for j in tl.static_range(W):
                step = s + (W - 1) - j  # the step whose tap j reads token p
                valid = mask_p & (step < seqlen)
                g = tl.load(dpre_base + step[:, None] * d_inner, mask=valid[:, None] & mask_d[None, :], other=0.)
                acc += g.to(tl.float32) * tl.load(w_ptr + row * W + j, mask=mask_d, other=0.).to(tl.float32)[None, :]
        tl.store(dx_ptr + b.to(tl.int64) * sdx_b + p[:, None] * sdx_l + offs_d[None, :],
                 acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])

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


_last_kernels = {}  # the latest compiled kernels, for benchmarks (registers, spills)


def _direct_launch_supported() -> bool:
    """Whether compiled kernels can be launched through their launcher directly: Triton's CUDA launcher with the
    calling convention of triton 3.3 - 3.8, ``(gridX, gridY, gridZ, stream, function, metadata, launch metadata,
    enter hook, exit hook, *every bound argument)``."""
    if not _on_cuda_compiler:
        return False
    try:
        from triton.backends.nvidia.driver import CudaLauncher
        names = list(inspect.signature(CudaLauncher.__call__).parameters)
    except Exception:  # pragma: no cover - another triton layout: Triton's own launch path
        return False
    return names[:6] == ['self', 'gridX', 'gridY', 'gridZ', 'stream', 'function']


_DIRECT_LAUNCH = _direct_launch_supported()
_compiled = {}  # (kernel, device, options, argument properties) -> the CompiledKernel Triton chose for them


@lru_cache(maxsize=None)
def _kernel_params(kernel):
    """(name, default) of every parameter of a @triton.jit function, in order: what its launcher takes."""
    return tuple((name, p.default) for name, p in inspect.signature(kernel.fn).parameters.items())


def _launch(kernel, grid, *args, num_warps: int, maxnreg: Optional[int] = None, **constexprs):
    """``kernel[grid](*args, num_warps=..., maxnreg=..., **constexprs)``: the first launch with given argument
    properties goes through Triton (which compiles, or finds the compiled kernel); later ones call that kernel's
    launcher directly. Triton's own path binds and specialises every argument again at every launch (the gate
    kernel: 25 us of host time per launch through Triton, 19 us direct, on a quiet H200 host; more with more
    arguments, and the mixer makes ten launches per layer). The key holds everything
    Triton specialises on: every non-tensor argument's value, each tensor's dtype and 16-byte alignment, the
    options, the constexprs and the device."""
    options = {'num_warps': num_warps}
    if maxnreg is not None:
        options['maxnreg'] = maxnreg
    if not _DIRECT_LAUNCH:
        return kernel[grid](*args, **constexprs, **options)
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    key = (kernel, device, num_warps, maxnreg, *constexprs.items(),
           *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args])
    compiled = _compiled.get(key)
    if compiled is None:
        if len(_compiled) > 4096:  # shapes keep changing (e.g. any image size): start over
            _compiled.clear()
        compiled = _compiled[key] = kernel[grid](*args, **constexprs, **options)
        return compiled
    bound = list(args)
    for name, default in _kernel_params(kernel)[len(args):]:
        bound.append(constexprs.get(name, default))
    grid = tuple(grid) + (1, 1)
    compiled.run(grid[0], grid[1], grid[2], driver.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *bound)
    return compiled


@lru_cache(maxsize=None)
def _has_register_cap() -> bool:
    """Whether this triton takes a per-kernel register cap (``maxnreg``; older versions do not)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return 'maxnreg' in CUDAOptions.__dataclass_fields__
    except Exception:  # pragma: no cover - another triton layout: run uncapped
        return False


def _lane_tile(cfg: ScanConfig, np_: int) -> bool:
    """Whether the backward's tile is (2, 16, 16) (time, state, channel) on one warp, which Triton lays out with
    channels on lane bits 0-3, state bit 0 on lane bit 4, and the time step and state bits 1-3 in each thread's
    registers (checked in tests/test_triton_scan.py). The backward then picks time steps with register moves
    and sums dB / dC as a lane reduce-scatter (``_channel_sums``)."""
    return (cfg.T_bwd, cfg.block_d_bwd, np_, cfg.warps_bwd) == (2, 16, 16, 1)


def _channels_last(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _cast(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """x in dtype; no call where it already is (a no-op ``Tensor.to`` still costs microseconds of host time, and the
    mixer and MLP make dozens of them per layer)."""
    return x if x is None or x.dtype == dtype else x.to(dtype)


def _dense(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return x if x is None or x.is_contiguous() else x.contiguous()


def _bkl_shape(u: torch.Tensor, batch: Optional[int]):
    """(b, K, L, d) of u: a (b, K, L, d) tensor, or with ``batch``, a direction-major (K, b L, d) one."""
    if batch is None:
        return u.shape
    return batch, u.shape[0], u.shape[1] // batch, u.shape[2]


def _bkl_strides(t: torch.Tensor, batch: Optional[int]):
    """The (b, K, L, c) strides the kernels take: t's own, or with ``batch``, those of the (b, K, L, c) view of a
    (K, b L, c) tensor (arithmetic instead of view ops: host time per layer counts at ARM-L's size)."""
    if batch is None:
        return t.stride()
    s_k, s_row, s_c = t.stride()
    return t.shape[1] // batch * s_row, s_k, s_row, s_c


def _scan_forward(u, delta, A, B, C, D, delta_bias, softplus, order, cfg: ScanConfig, a_is_log: bool = False,
                  batch: Optional[int] = None):
    """y, direction-major (K, b, L, d) memory: its (b, K, L, d) view, or with ``batch`` (inputs given as (K, b L, c)
    tensors) the (K, b L, d) tensor. a_is_log: A holds A_log (A = -exp(A_log))."""
    batch_, num_dirs, seqlen, d_inner = _bkl_shape(u, batch)
    d_state = A.shape[-1]
    y = torch.empty((num_dirs, batch_ * seqlen, d_inner), device=u.device, dtype=u.dtype)
    grid = (triton.cdiv(d_inner, cfg.block_d_fwd), num_dirs, batch_)
    _last_kernels['scan_fwd'] = _launch(
        _scan_fwd_kernel, grid, u, delta, A, B, C, D if D is not None else A,
        delta_bias if delta_bias is not None else A,
        order if order is not None else A, y, *_bkl_strides(u, batch), *_bkl_strides(delta, batch),
        *_bkl_strides(B, batch), *_bkl_strides(C, batch), seqlen, d_inner, d_state,
        NP=_pow2(d_state), BLOCK_D=cfg.block_d_fwd, T=cfg.T, HAS_D=D is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_ORDER=order is not None, A_IS_LOG=a_is_log,
        num_warps=cfg.warps_fwd)
    return y if batch is not None else y.view(num_dirs, batch_, seqlen, d_inner).transpose(0, 1)


def _scan_backward(dy, u, delta, A, B, C, D, delta_bias, softplus, order, cfg: ScanConfig, a_is_log: bool = False,
                   batch: Optional[int] = None):
    """(du, ddelta, dA, dB, dC, dD, dbias); with a_is_log, A holds A_log and dA is the gradient of A_log. With
    ``batch``, u, delta, B, C are direction-major (K, b L, c) tensors (dy a (b, K, L, d) view) and du, ddelta, dB, dC
    come back in that layout; else all are (b, K, L, c)."""
    batch_in = batch
    batch, num_dirs, seqlen, d_inner = _bkl_shape(u, batch)
    d_state = A.shape[-1]
    np_ = _pow2(d_state)
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
        _last_kernels['scan_states'] = _launch(
            _scan_fwd_kernel, grid, u, delta, A, B, C, A, delta_bias if delta_bias is not None else A,
            order if order is not None else A, segments, *_bkl_strides(u, batch_in), *_bkl_strides(delta, batch_in),
            *_bkl_strides(B, batch_in), *_bkl_strides(C, batch_in), seqlen, d_inner, d_state, NP=np_,
            BLOCK_D=cfg.block_d_fwd, T=cfg.T, HAS_D=False, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_ORDER=order is not None, SEGMENT_CHUNKS=segment_steps // cfg.T,
            A_IS_LOG=a_is_log, num_warps=cfg.warps_fwd)
    # the backward kernel takes A itself: computing it from A_log in there took registers it has none to spare for
    # (the kernel ran 28 % slower in an ARM-B training step on an H200)
    if a_is_log:
        A = -torch.exp(A)
    grid = (num_blocks, num_dirs, batch)
    _last_kernels['scan_bwd'] = _launch(
        _scan_bwd_kernel, grid, u, delta, A, B, C, D if D is not None else A,
        delta_bias if delta_bias is not None else A, order if order is not None else A, dy, segments, chunk_starts,
        du, ddelta, dparams, dBC, *_bkl_strides(u, batch_in), *_bkl_strides(delta, batch_in),
        *_bkl_strides(B, batch_in), *_bkl_strides(C, batch_in), *dy.stride(), seqlen, d_inner, d_state, NP=np_,
        BLOCK_D=cfg.block_d_bwd, T=cfg.T_bwd, M=cfg.chunks_per_segment, HAS_D=D is not None,
        LANE_TILE=_lane_tile(cfg, np_), HAS_STATES=has_states, ATOMIC=atomic,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_ORDER=order is not None, num_warps=cfg.warps_bwd,
        **({'maxnreg': cfg.max_registers_bwd} if cfg.max_registers_bwd and _has_register_cap() else {}))
    dparams = dparams[0] if atomic else dparams.sum(0)  # one reduction over the batch for dA, dD and dbias
    dA = dparams[:kd * d_state].view(A.shape)
    if a_is_log:  # d A / d A_log = A
        dA = dA * A
    dD = _cast(dparams[kd * d_state:kd * (d_state + 1)].view(D.shape), D.dtype) if D is not None else None
    dbias = _cast(dparams[kd * (d_state + 1):].view(delta_bias.shape), delta_bias.dtype) if delta_bias is not None \
        else None
    # one cast for dB and dC (after one reduction over the channel blocks): (K, b, L, [dB | dC]) in B's dtype
    dBC = _cast(dBC if atomic else dBC.sum(2), B.dtype)
    if batch_in is not None:
        dBC = dBC.view(num_dirs, batch * seqlen, 2 * np_)
        return (du.view(num_dirs, -1, d_inner), ddelta.view(num_dirs, -1, d_inner), dA, dBC[..., :d_state],
                dBC[..., np_:np_ + d_state], dD, dbias)
    dB, dC = dBC[..., :d_state].transpose(0, 1), dBC[..., np_:np_ + d_state].transpose(0, 1)
    return du.transpose(0, 1), ddelta.transpose(0, 1), dA, dB, dC, dD, dbias


class _ScanTokens(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus, order, cfg):
        u, delta, B, C = (_channels_last(t) for t in (u, delta, B, C))
        y = _scan_forward(u, delta, A, B, C, D, delta_bias, softplus, order, cfg)
        if any(ctx.needs_input_grad[:7]):
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, order)
            ctx.softplus, ctx.cfg = softplus, cfg
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, order = ctx.saved_tensors
        grads = _scan_backward(_channels_last(dy), u, delta, A, B, C, D, delta_bias, ctx.softplus, order, ctx.cfg)
        dA = grads[2].to(A.dtype)
        return grads[:2] + (dA,) + grads[3:] + (None, None, None)


def _check_order(order: Optional[torch.Tensor], num_dirs: int, seqlen: int, name: str = 'order'):
    if order is None:
        return None
    if order.shape != (num_dirs, seqlen):
        raise ValueError(f'selective_scan: {name} must be (directions, L) = {(num_dirs, seqlen)}, got '
                         f'{tuple(order.shape)}')
    return _dense(_cast(order, torch.int32))


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
    """Selective scan of K directions over one token sequence, token-major (see the module docstring).

    u, delta: (b, K, L, d);  A: (K, d, N);  B, C: (b, K, L, N);  D, delta_bias: (K, d);  order: (K, L) token
    index of each scan step (None: token order). Any strides with channels (and states) contiguous are read as
    they are. Returns y (b, K, L, d) in u's dtype, y[:, k, p] being direction k's output at token p.
    """
    if not has_triton:
        raise RuntimeError('timm_arm: the triton selective scan needs triton installed')
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


def selective_scan_triton(
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
    """The Triton scan in mamba-ssm's channel-first layout (``selective_scan_torch``'s shapes): u, delta, z
    (b, G*d, L), B, C (b, G, N, L), A (G*d, N). Reads the inputs through strided views (no copies); the gate
    silu(z) is applied on the output."""
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
        y = (y.float() * torch.nn.functional.silu(z.float())).to(u.dtype)
    return y


# conv programs: scan steps walked per program, channels, warps (forward, and the backward's d(pre-activation));
# dx tiles (tokens, channels, warps)
CONV_STEPS, CONV_BLOCK_D, CONV_WARPS = 64, 128, 1
CONV_BWD_STEPS, CONV_BWD_BLOCK_D, CONV_BWD_WARPS = 64, 128, 1
CONV_DX_BLOCK_T, CONV_DX_BLOCK_D, CONV_DX_WARPS = 16, 64, 2  # swept on an H200 at ARM-B's shape


class _ConvTokens(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, order, inverse):
        u = _conv_forward(x, weight, bias, order)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(x, weight, bias, order, inverse)
        return u

    @staticmethod
    def backward(ctx, du):
        x, weight, bias, order, inverse = ctx.saved_tensors
        dx, dw, db = _conv_backward(_channels_last(du), x, weight, bias, order, inverse)
        return dx, dw.to(weight.dtype), db.to(bias.dtype), None, None


def _check_width(width: int) -> None:
    if not 1 <= width <= 4:
        raise ValueError(f'causal_conv1d: the Triton conv takes widths 1 to 4 (as causal-conv1d), got {width}; '
                         f"use backend='torch' for wider convs")


def causal_conv1d_silu_tokens(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        order: Optional[torch.Tensor] = None,
        inverse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """silu(depthwise causal conv) of K directions along their scan orders, token-major.

    x: (b, L, d) with contiguous channels (a slice of the in-projection's output is read in place); weight:
    (K, d, W); bias: (K, d); order / inverse: (K, L) scan order and its inverse (None: token order).
    Returns u (b, K, L, d), u[:, k, p] being direction k's conv output at token p.
    """
    if not has_triton:
        raise RuntimeError('timm_arm: the triton causal conv needs triton installed')
    batch, seqlen, d_inner = x.shape
    if weight.dim() != 3 or weight.shape[1] != d_inner or bias.shape != weight.shape[:2]:
        raise ValueError(f'causal_conv1d: weight must be (K, {d_inner}, W) and bias (K, {d_inner}), got '
                         f'{tuple(weight.shape)}, {tuple(bias.shape)}')
    _check_width(weight.shape[-1])
    if (order is None) != (inverse is None):
        raise ValueError('causal_conv1d: order and inverse go together')
    order = _check_order(order, weight.shape[0], seqlen)
    inverse = _check_order(inverse, weight.shape[0], seqlen, 'inverse')
    return _ConvTokens.apply(_channels_last(x), weight.contiguous(), bias.contiguous(), order, inverse)


def _conv_forward(x, weight, bias, order, direction_major: bool = False):
    """u as a (b, K, L, d) view of direction-major memory, or the (K, b L, d) tensor itself (direction_major)."""
    batch, seqlen, d_inner = x.shape
    num_dirs, _, width = weight.shape
    u = torch.empty((num_dirs, batch, seqlen, d_inner), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(d_inner, CONV_BLOCK_D), triton.cdiv(seqlen, CONV_STEPS), batch * num_dirs)
    _launch(_conv_fwd, grid, x, weight, bias, order if order is not None else weight, u, x.stride(0), x.stride(1),
            seqlen, d_inner, num_dirs, W=width, STEPS=CONV_STEPS, BLOCK_D=CONV_BLOCK_D, HAS_ORDER=order is not None,
            num_warps=CONV_WARPS)
    return u.view(num_dirs, batch * seqlen, d_inner) if direction_major else u.transpose(0, 1)


def _conv_backward(du, x, weight, bias, order, inverse, dx=None):
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
    du_strides = _bkl_strides(du, batch if du.dim() == 3 else None)
    _launch(_conv_bwd_pre, grid, x, weight, bias, order if has_order else weight, du, dpre, dw, x.stride(0),
            x.stride(1), *du_strides[:3], seqlen, d_inner, num_dirs, W=width, STEPS=CONV_BWD_STEPS,
            BLOCK_D=CONV_BWD_BLOCK_D, HAS_ORDER=has_order, num_warps=CONV_BWD_WARPS)
    if dx is None:
        dx = torch.empty((batch, seqlen, d_inner), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(d_inner, CONV_DX_BLOCK_D), triton.cdiv(seqlen, CONV_DX_BLOCK_T), batch)
    _launch(_conv_bwd_dx, grid, dpre, weight, inverse if has_order else weight, dx, dx.stride(0), dx.stride(1),
            seqlen, d_inner, num_dirs, W=width, BLOCK_T=CONV_DX_BLOCK_T, BLOCK_D=CONV_DX_BLOCK_D,
            HAS_ORDER=has_order, num_warps=CONV_DX_WARPS)
    dw = dw.view(num_dirs, batch, t_blocks, width + 1, d_inner).sum((1, 2))  # (K, W + 1, d)
    return dx, dw[:, :width].transpose(1, 2), dw[:, width]


def _core_forward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, order, cfg):
    """conv -> x_proj -> dt_proj -> scan of K directions -> mean over directions -> gate by silu(z), from the
    in-projection's output xz = [x, z] (b, L, 2d). Returns (out (b, L, d), the tensors the backward keeps).

    Keeps the conv output u, the thin x_proj output and the mean for the backward, and recomputes delta there (a
    thin matmul) instead of keeping a second (b, K, L, d) activation per layer. (Recomputing u too, a conv, would
    save one more: ARM-B 1.6 GiB of training memory for about 3 % more time per step on an H200;
    benchmarks/RESULTS.md.) Direction-major activations (K, b L, c): the projections are K plain batched matmuls
    and the kernels are given strides, not views.
    """
    dtype, (num_dirs, d_inner, _), rank = xz.dtype, A_log.shape, dt_proj_weight.shape[-1]
    batch, seqlen = xz.shape[:2]
    u = _conv_forward(xz[..., :d_inner], conv_weight, conv_bias, order, direction_major=True)
    w_x, w_dt = _cast(x_proj_weight, dtype), _cast(dt_proj_weight, dtype)  # kept for the backward (small)
    x_dbl = torch.bmm(u, w_x.transpose(1, 2))  # (K, b L, R + 2N)
    delta = torch.bmm(x_dbl[..., :rank], w_dt.transpose(1, 2))  # (K, b L, d)
    B, C = x_dbl[..., rank:].chunk(2, dim=-1)
    y = _scan_forward(u, delta, A_log, B, C, D, dt_proj_bias, True, order, cfg, a_is_log=True, batch=batch)
    del delta
    out = torch.empty((batch, seqlen, d_inner), device=xz.device, dtype=dtype)
    mean = torch.empty_like(out)
    grid = (triton.cdiv(d_inner, GATE_BLOCK_D), triton.cdiv(seqlen, GATE_BLOCK_T), batch)
    _launch(_gate_fwd, grid, y, xz[..., d_inner:], out, mean, xz.stride(0), xz.stride(1), seqlen, d_inner,
            num_dirs, BLOCK_T=GATE_BLOCK_T, BLOCK_D=GATE_BLOCK_D, num_warps=4)
    return out, (xz, conv_weight, conv_bias, w_x, w_dt, dt_proj_bias, A_log, D, x_dbl, mean, u)


def _core_backward(dout, saved, order, inverse, cfg):
    """The gradients of ``_core_forward``'s inputs xz, conv weight / bias, x_proj / dt_proj weights (in the
    activations' dtype), dt bias, A_log, D, from dout (b, L, d) with contiguous channels."""
    xz, conv_weight, conv_bias, w_x, w_dt, dt_proj_bias, A_log, D, x_dbl, mean, u = saved
    (num_dirs, d_inner, _), rank = A_log.shape, w_dt.shape[-1]
    batch, seqlen = xz.shape[:2]
    dxz = torch.empty_like(xz)
    dy = torch.empty_like(mean)  # the gradient of each direction's y: dout silu(z) / K
    grid = (triton.cdiv(d_inner, GATE_BLOCK_D), triton.cdiv(seqlen, GATE_BLOCK_T), batch)
    _launch(_gate_bwd, grid, dout, mean, xz[..., d_inner:], dy, dxz[..., d_inner:], dout.stride(0),
            dout.stride(1), xz.stride(0), xz.stride(1), dxz.stride(0), dxz.stride(1), seqlen, d_inner, num_dirs,
            BLOCK_T=GATE_BLOCK_T, BLOCK_D=GATE_BLOCK_D, num_warps=4)

    dt = x_dbl[..., :rank]
    delta = torch.bmm(dt, w_dt.transpose(1, 2))
    B, C = x_dbl[..., rank:].chunk(2, dim=-1)
    dy = dy.unsqueeze(1).expand(batch, num_dirs, seqlen, d_inner)  # the same for every direction: stride 0
    du, ddelta, dA_log, dB, dC, dD, dbias = _scan_backward(
        dy, u, delta, A_log, B, C, D, dt_proj_bias, True, order, cfg, a_is_log=True, batch=batch)
    del delta
    d_w_dt = torch.bmm(ddelta.transpose(1, 2), dt)  # (K, d, R)
    dx_dbl = torch.cat([torch.bmm(ddelta, w_dt), dB, dC], dim=-1)  # (K, b L, R + 2N)
    del ddelta
    du.baddbmm_(dx_dbl, w_x)
    d_w_x = torch.bmm(dx_dbl.transpose(1, 2), u)  # (K, R + 2N, d)
    del u, dx_dbl
    _, d_conv_w, d_conv_b = _conv_backward(du, xz[..., :d_inner], conv_weight, conv_bias, order, inverse,
                                           dxz[..., :d_inner])
    return (dxz, _cast(d_conv_w, conv_weight.dtype), _cast(d_conv_b, conv_bias.dtype), d_w_x, d_w_dt, dbias,
            _cast(dA_log, A_log.dtype), dD)


class _MixerCore(torch.autograd.Function):
    """``_core_forward`` as one autograd node taking the in-projection's output xz = [x, z]."""

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, order,
                inverse, cfg):
        out, saved = _core_forward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                                   order, cfg)
        ctx.save_for_backward(order, inverse, *saved)
        ctx.weight_dtypes = x_proj_weight.dtype, dt_proj_weight.dtype
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        order, inverse, *saved = ctx.saved_tensors
        grads = _core_backward(_channels_last(dout), saved, order, inverse, ctx.cfg)
        x_proj_dtype, dt_proj_dtype = ctx.weight_dtypes
        return (*grads[:3], _cast(grads[3], x_proj_dtype), _cast(grads[4], dt_proj_dtype), *grads[5:], None, None,
                None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes in on x: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _Mixer(torch.autograd.Function):
    """The whole mixer, in-projection -> ``_core_forward`` -> out-projection, as one autograd node (as mamba-ssm's
    ``mamba_inner_fn``): the two projections' weight casts, GEMMs and gradients cost no autograd nodes of their own,
    which is host time per layer where the step is partly host-bound (ARM-L on the H200's host). Same dtypes as
    nn.Linear under autocast: the GEMMs in the autocast dtype, the gradients in the inputs' and weights' own."""

    @staticmethod
    def forward(ctx, x, in_proj_weight, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log,
                D, out_proj_weight, order, inverse, cfg):
        dtype = _compute_dtype(x)
        batch, seqlen, dim = x.shape
        x2 = _cast(x.reshape(batch * seqlen, dim), dtype)
        w_in, w_out = _cast(in_proj_weight, dtype), _cast(out_proj_weight, dtype)
        xz = torch.mm(x2, w_in.t()).view(batch, seqlen, -1)
        out, saved = _core_forward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                                   order, cfg)
        y = torch.mm(out.view(batch * seqlen, -1), w_out.t())
        ctx.save_for_backward(x2, w_in, w_out, out, order, inverse, *saved)
        ctx.dtypes = x.dtype, in_proj_weight.dtype, x_proj_weight.dtype, dt_proj_weight.dtype, out_proj_weight.dtype
        ctx.cfg = cfg
        return y.view(batch, seqlen, -1)

    @staticmethod
    def backward(ctx, dy):
        x2, w_in, w_out, out, order, inverse, *saved = ctx.saved_tensors
        x_dtype, in_dtype, x_proj_dtype, dt_proj_dtype, out_dtype = ctx.dtypes
        batch, seqlen, dim = dy.shape
        dy2 = _cast(dy.reshape(batch * seqlen, dim), w_out.dtype)
        d_w_out = _cast(torch.mm(dy2.t(), out.view(batch * seqlen, -1)), out_dtype)
        dout = torch.mm(dy2, w_out).view(batch, seqlen, -1)
        dxz, *grads = _core_backward(dout, saved, order, inverse, ctx.cfg)
        dxz = dxz.view(batch * seqlen, -1)
        dx = _cast(torch.mm(dxz, w_in).view(batch, seqlen, dim), x_dtype) if ctx.needs_input_grad[0] else None
        d_w_in = _cast(torch.mm(dxz.t(), x2), in_dtype)
        return (dx, d_w_in, *grads[:2], _cast(grads[2], x_proj_dtype), _cast(grads[3], dt_proj_dtype), *grads[4:],
                d_w_out, None, None, None)


GATE_BLOCK_T, GATE_BLOCK_D = 16, 128


def _check_mixer(xz_width, conv_weight, x_proj_weight, dt_proj_weight, A_log, order, inverse, seqlen):
    num_dirs, d_inner, d_state = A_log.shape
    if xz_width != 2 * d_inner or conv_weight.shape[:2] != (num_dirs, d_inner) or x_proj_weight.shape[1:] != (
            dt_proj_weight.shape[-1] + 2 * d_state, d_inner):
        raise ValueError(f'mixer: in-projection width {xz_width}, conv_weight {tuple(conv_weight.shape)}, '
                         f'x_proj_weight {tuple(x_proj_weight.shape)} do not fit A_log {tuple(A_log.shape)}')
    if (order is None) != (inverse is None):
        raise ValueError('mixer: order and inverse go together')
    _check_width(conv_weight.shape[-1])
    return _check_order(order, num_dirs, seqlen), _check_order(inverse, num_dirs, seqlen, 'inverse')


@torch.compiler.disable  # Triton launches and their autograd node stay opaque to torch.compile (a graph break)
def mixer_core_tokens(
        xz: torch.Tensor,
        conv_weight: torch.Tensor,
        conv_bias: torch.Tensor,
        x_proj_weight: torch.Tensor,
        dt_proj_weight: torch.Tensor,
        dt_proj_bias: torch.Tensor,
        A_log: torch.Tensor,
        D: torch.Tensor,
        order: Optional[torch.Tensor] = None,
        inverse: Optional[torch.Tensor] = None,
        config: Optional[ScanConfig] = None,
) -> torch.Tensor:
    """The K-direction mixer core on the Triton kernels, token-major (``mixer_core``'s semantics).

    xz: (b, L, 2d) in-projection output [x, z], contiguous channels; conv_weight: (K, d, W); conv_bias,
    dt_proj_bias, D: (K, d); x_proj_weight: (K, R + 2N, d); dt_proj_weight: (K, d, R); A_log: (K, d, N) (A =
    -exp(A_log) is taken inside the kernels); order / inverse: (K, L) or None. Returns mean over directions of the
    scan outputs * silu(z), (b, L, d).
    """
    if not has_triton:
        raise RuntimeError('timm_arm: the triton mixer needs triton installed')
    order, inverse = _check_mixer(xz.shape[-1], conv_weight, x_proj_weight, dt_proj_weight, A_log, order, inverse,
                                  xz.shape[1])
    cfg = config or scan_config(A_log.shape[1], xz.shape[1], A_log.shape[2])
    return _MixerCore.apply(
        _channels_last(xz), _dense(conv_weight), _dense(conv_bias), x_proj_weight, dt_proj_weight,
        _dense(dt_proj_bias), _dense(_cast(A_log, torch.float32)), _dense(D), order, inverse, cfg)


@torch.compiler.disable
def mixer_tokens(
        x: torch.Tensor,
        in_proj_weight: torch.Tensor,
        conv_weight: torch.Tensor,
        conv_bias: torch.Tensor,
        x_proj_weight: torch.Tensor,
        dt_proj_weight: torch.Tensor,
        dt_proj_bias: torch.Tensor,
        A_log: torch.Tensor,
        D: torch.Tensor,
        out_proj_weight: torch.Tensor,
        order: Optional[torch.Tensor] = None,
        inverse: Optional[torch.Tensor] = None,
        config: Optional[ScanConfig] = None,
) -> torch.Tensor:
    """The whole K-direction mixer on the Triton kernels as one autograd node: out_proj(core(in_proj(x))), x (b, L,
    dim); in_proj_weight (2d, dim) and out_proj_weight (dim, d) without biases; the rest as ``mixer_core_tokens``."""
    if not has_triton:
        raise RuntimeError('timm_arm: the triton mixer needs triton installed')
    if x.dim() != 3 or in_proj_weight.shape[1] != x.shape[-1] or out_proj_weight.shape[1] != A_log.shape[1]:
        raise ValueError(f'mixer: x {tuple(x.shape)}, in_proj_weight {tuple(in_proj_weight.shape)}, out_proj_weight '
                         f'{tuple(out_proj_weight.shape)} do not fit A_log {tuple(A_log.shape)}')
    order, inverse = _check_mixer(in_proj_weight.shape[0], conv_weight, x_proj_weight, dt_proj_weight, A_log, order,
                                  inverse, x.shape[1])
    cfg = config or scan_config(A_log.shape[1], x.shape[1], A_log.shape[2])
    return _Mixer.apply(
        x, in_proj_weight, _dense(conv_weight), _dense(conv_bias), x_proj_weight, dt_proj_weight,
        _dense(dt_proj_bias), _dense(_cast(A_log, torch.float32)), _dense(D), out_proj_weight, order, inverse, cfg)


SWIGLU_BLOCK_R, SWIGLU_BLOCK_C = 8, 256


def _swiglu_launch(x: torch.Tensor, gate_last: bool) -> torch.Tensor:
    rows, width = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, width), device=x.device, dtype=x.dtype)
    gate_col, value_col = (width, 0) if gate_last else (0, width)
    grid = (triton.cdiv(width, SWIGLU_BLOCK_C), triton.cdiv(rows, SWIGLU_BLOCK_R))
    _launch(_swiglu_fwd, grid, x, out, rows, width, x.stride(0), gate_col, value_col, BLOCK_R=SWIGLU_BLOCK_R,
            BLOCK_C=SWIGLU_BLOCK_C, num_warps=4)
    return out


def _swiglu_grad(x: torch.Tensor, dout: torch.Tensor, gate_last: bool) -> torch.Tensor:
    rows, width = dout.shape
    dx = torch.empty((rows, 2 * width), device=x.device, dtype=x.dtype)
    gate_col, value_col = (width, 0) if gate_last else (0, width)
    grid = (triton.cdiv(width, SWIGLU_BLOCK_C), triton.cdiv(rows, SWIGLU_BLOCK_R))
    _launch(_swiglu_bwd, grid, x, dout, dx, rows, width, x.stride(0), dout.stride(0), gate_col, value_col,
            BLOCK_R=SWIGLU_BLOCK_R, BLOCK_C=SWIGLU_BLOCK_C, num_warps=4)
    return dx


def _pad_rows(w: Optional[torch.Tensor], parts: int, rows: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """w (parts * r, ...) cast to dtype, each of its ``parts`` blocks of rows zero-padded to ``rows``."""
    if w is None:
        return None
    w = _cast(w, dtype)
    pad = rows - w.shape[0] // parts
    if pad == 0:
        return w
    w = w.unflatten(0, (parts, -1))
    return torch.nn.functional.pad(w, (0, 0) * (w.dim() - 2) + (0, pad)).flatten(0, 1)


def _unpad_rows(g: Optional[torch.Tensor], parts: int, rows: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The inverse of ``_pad_rows`` for a gradient: (parts * rows_padded, ...) -> (parts * rows, ...) in dtype."""
    if g is None:
        return None
    if g.shape[0] != parts * rows:
        return g.unflatten(0, (parts, -1))[:, :rows].to(dtype, memory_format=torch.contiguous_format).flatten(0, 1)
    return _cast(g, dtype)


class _SwiGLUMlp(torch.autograd.Function):
    """fc2(silu(gate) * value) of fc1's two halves as one autograd node: two GEMMs and one elementwise kernel each
    way, with no separate autograd nodes (host time) for the weight casts, the GEMMs or the padding.

    The hidden width is zero-padded to a multiple of 8 inside (fc1's halves' rows, fc2's columns): rows of 2730
    bf16 values (ARM-L's width) are not 16-byte aligned and send cuBLAS to slow kernels. The padded columns of
    the hidden activation are silu(0) * 0 = 0, so results are those of the unpadded MLP; the weights' gradients are
    returned unpadded. Dtypes as nn.Linear under autocast."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, gate_last):
        dtype = _compute_dtype(x)
        hidden = w2.shape[1]
        padded = hidden + (-hidden % 8)
        x2 = _cast(x.reshape(-1, x.shape[-1]), dtype)
        w1c, b1c = _pad_rows(w1, 2, padded, dtype), _pad_rows(b1, 2, padded, dtype)
        w2c = _cast(w2, dtype)
        if padded != hidden:
            w2c = torch.nn.functional.pad(w2c, (0, padded - hidden))
        a = torch.addmm(b1c, x2, w1c.t()) if b1c is not None else torch.mm(x2, w1c.t())
        h = _swiglu_launch(a, gate_last)
        y = torch.addmm(_cast(b2, dtype), h, w2c.t()) if b2 is not None else torch.mm(h, w2c.t())
        ctx.save_for_backward(x2, w1c, a, h, w2c)
        ctx.meta = x.dtype, w1.dtype, b1.dtype if b1 is not None else None, w2.dtype, \
            b2.dtype if b2 is not None else None, hidden, gate_last
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, w1c, a, h, w2c = ctx.saved_tensors
        x_dtype, w1_dtype, b1_dtype, w2_dtype, b2_dtype, hidden, gate_last = ctx.meta
        lead = dy.shape[:-1]
        dy2 = _cast(dy.reshape(-1, dy.shape[-1]), h.dtype)
        d_w2 = torch.mm(dy2.t(), h)
        d_w2 = _cast(d_w2, w2_dtype) if d_w2.shape[1] == hidden else \
            d_w2[:, :hidden].to(w2_dtype, memory_format=torch.contiguous_format)
        d_b2 = _cast(dy2.sum(0), b2_dtype) if b2_dtype is not None else None
        da = _swiglu_grad(a, torch.mm(dy2, w2c), gate_last)
        del a, h
        d_w1 = _unpad_rows(torch.mm(da.t(), x2), 2, hidden, w1_dtype)
        d_b1 = _unpad_rows(da.sum(0), 2, hidden, b1_dtype) if b1_dtype is not None else None
        dx = _cast(torch.mm(da, w1c).view(*lead, -1), x_dtype) if ctx.needs_input_grad[0] else None
        return dx, d_w1, d_b1, d_w2, d_b2, None


@torch.compiler.disable
def swiglu_mlp_triton(
        x: torch.Tensor,
        fc1_weight: torch.Tensor,
        fc1_bias: Optional[torch.Tensor],
        fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor],
        gate_last: bool = False,
) -> torch.Tensor:
    """fc2(silu(gate) * value) with [gate; value] = fc1(x) (timm GluMlp's halves: gate first unless gate_last) as
    one autograd node: fc1_weight (2 H, C), fc2_weight (C_out, H)."""
    if not has_triton:
        raise RuntimeError('timm_arm: the triton SwiGLU needs triton installed')
    hidden = fc2_weight.shape[1]
    if fc1_weight.shape != (2 * hidden, x.shape[-1]) or (fc1_bias is not None and fc1_bias.shape != (2 * hidden,)):
        raise ValueError(f'swiglu_mlp: fc1 weight {tuple(fc1_weight.shape)} does not map x {tuple(x.shape)} to the '
                         f'2 x {hidden} gate and value halves fc2 weight {tuple(fc2_weight.shape)} takes')
    return _SwiGLUMlp.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, bool(gate_last))


def _add_layer_norm_forward(residual, branch, weight, bias, eps, out_dtype):
    """Launch the fused kernel: (total, normed output, (2, ..., 1) fp32 mean / rstd). total is residual itself
    without a branch."""
    cols = residual.shape[-1]
    res = residual.contiguous()
    total = torch.empty_like(res, dtype=torch.promote_types(res.dtype, branch.dtype)) if branch is not None else res
    out = torch.empty_like(res, dtype=out_dtype)
    stats = torch.empty((2, *res.shape[:-1], 1), device=res.device, dtype=torch.float32)
    rows = res.numel() // cols
    block_c = _pow2(cols)
    block_r = max(1, 4096 // block_c)
    _launch(
        _add_layer_norm_fwd, (triton.cdiv(rows, block_r),), res, branch.contiguous() if branch is not None else res,
        weight, bias if bias is not None else weight,
        total, out, stats[0], stats[1], rows, cols, eps, HAS_BRANCH=branch is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_c >= 4096 else 4)
    return total, out, stats


class _AddLayerNorm(torch.autograd.Function):
    """(residual + branch, LayerNorm of it) in one pass over memory, the normed output in out_dtype (what the next
    Linear reads under autocast: no separate cast); PyTorch's LayerNorm backward from the kept statistics."""

    @staticmethod
    def forward(ctx, residual, branch, weight, bias, eps, out_dtype):
        total, out, stats = _add_layer_norm_forward(residual, branch, weight, bias, eps, out_dtype)
        ctx.save_for_backward(total, weight, bias, stats)
        ctx.dtypes = residual.dtype, branch.dtype if branch is not None else None
        return out if branch is None else (total, out)

    @staticmethod
    def backward(ctx, *grads):
        total, weight, bias, stats = ctx.saved_tensors
        res_dtype, branch_dtype = ctx.dtypes
        d_total, d_out = grads if branch_dtype is not None else (None, grads[0])
        dx = dw = db = None
        if d_out is not None:
            mask = [True, ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]]
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                d_out.to(total.dtype), total, total.shape[-1:], stats[0], stats[1], weight, bias, mask)
        if d_total is not None:
            dx = d_total if dx is None else dx + d_total
        if dx is None:
            return None, None, dw, db, None, None
        d_branch = dx.to(branch_dtype) if branch_dtype is not None and ctx.needs_input_grad[1] else None
        return dx.to(res_dtype), d_branch, dw, db, None, None


@torch.compiler.disable
def add_layer_norm_triton(residual, branch, weight, bias, eps, out_dtype, needs_grad=True):
    """``ops.add_layer_norm`` as one Triton kernel forward (PyTorch's LayerNorm backward); branch may be None
    (LayerNorm of residual alone). Returns (total, normed). needs_grad False: the launch alone, no autograd node."""
    if not has_triton:
        raise RuntimeError('timm_arm: the triton LayerNorm needs triton installed')
    if not needs_grad:
        total, out, _ = _add_layer_norm_forward(residual, branch, weight, bias, eps, out_dtype)
        return (residual, out) if branch is None else (total, out)
    out = _AddLayerNorm.apply(residual, branch, weight, bias, eps, out_dtype)
    return (residual, out) if branch is None else out
