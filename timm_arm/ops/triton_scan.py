""" Selective scan in Triton, forward and backward, made for vision-length sequences (L up to ~1024).

Same semantics and shapes as ``selective_scan_torch`` (see ``timm_arm.ops.selective_scan``):
    u, delta, z: (b, Dc, L);  A: (Dc, N);  B, C: (b, G, N, L);  D, delta_bias: (Dc,)
    delta = softplus(delta + delta_bias);  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t
    y_t = <h_t, C_t> + D u_t;  out_t = y_t * silu(z_t)

mamba-ssm's kernel is built for chunks of 2048 steps and is ~20x above its memory floor at L ~ 200. Here one
program owns BLOCK_D channels x N states of one image and walks the sequence in chunks of T steps: it loads
(T, BLOCK_D) tiles, builds the (T, N, BLOCK_D) decays and inputs, and runs tl.associative_scan along T, the
chunk's first step taking the carried state. Channels are the fastest tile axis, so Triton's default layout
puts channels across lanes and keeps T x N in each thread's registers: the scan and the sums over N run
in-thread, with no shuffles. The state is fp32 throughout; inputs may be bf16 or fp32.

The forward saves the state every T_bwd steps, (b, Dc, L/T_bwd, N) fp32. The backward walks chunks in
reverse, recomputes the chunk's states from its saved start, and runs the adjoint
    lam_t = C_t g_t + a_{t+1} lam_{t+1}        (g = dout * silu(z), a_t = exp(delta_t A))
as a reverse associative scan (a_{t+1} comes from a second, shifted load of delta). With b_t = delta_t B_t u_t,
a_t h_{t-1} = h_t - b_t, so no division and no exclusive scan is needed:
    ddelta_t = sum_n lam_t ((h_t - b_t) A + u_t B_t),   du_t = delta_t sum_n lam_t B_t + D g_t,
    dA = sum_{b,t} lam_t (h_t - b_t) delta_t,   dB_t = sum_{c in group} lam_t delta_t u_t,   dC_t = sum_c g_t h_t.
Sums across programs (over the batch for dA, dD, ddelta_bias; over the channel blocks of a group for dB,
dC) go through per-program fp32 partials reduced in PyTorch: deterministic, no atomics.

Constraints: a block of channels lies inside one B/C group (blocks are laid out per group and masked, so any
channel count works); N is padded to a power of two internally (masked).
"""
import math
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
    has_triton = True
except ImportError:  # pragma: no cover - the package works without triton, this backend does not
    triton = tl = None
    has_triton = False

__all__ = ['selective_scan_triton', 'has_triton', 'ScanConfig', 'scan_config']

class ScanConfig(NamedTuple):
    T: int  # forward: time steps per chunk (power of two)
    block_d_fwd: int  # forward: channels per program
    warps_fwd: int
    T_bwd: int  # backward: time steps per chunk, divides T (the forward saves the state every T_bwd steps)
    block_d_bwd: int
    warps_bwd: int


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def scan_config(channels_per_group: int, seqlen: int, d_state: int) -> ScanConfig:
    """Tile sizes. Channels go across lanes, T steps x N states stay in each thread's registers.

    Measured on an H200 at ARM-B's shape (b 128, 3072 channels in 4 groups, L 197, N 16, bf16): forward best at
    T 8, 16 channels, 1 warp; backward (more live tiles, 255 registers) best at T 4, 16 channels, 1 warp.
    """
    T = min(8, max(2, _pow2(seqlen)))
    block_d = min(16, _pow2(channels_per_group))
    return ScanConfig(T, block_d, 1, min(4, T), block_d, 1)


if has_triton:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _softplus(x):
        # log(1 + e^x) without overflow and without losing small values
        return tl.maximum(x, 0.) + tl.log(1. + tl.exp(-tl.abs(x)))

    @triton.jit
    def _channel_block(pid_d, channels_per_group, BLOCK_D: tl.constexpr):
        """Channels of this program's block: blocks are laid out per group, so one block reads one B/C group."""
        blocks_per_group = tl.cdiv(channels_per_group, BLOCK_D)
        group = pid_d // blocks_per_group
        within = (pid_d % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
        return group, group * channels_per_group + within, within < channels_per_group

    @triton.jit
    def _scan_fwd_kernel(
            u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
            stride_u_b, stride_u_d, stride_dt_b, stride_dt_d, stride_z_b, stride_z_d,
            stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
            seqlen, channels, channels_per_group, d_state, num_chunks,
            NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
            HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
            SAVE_STATES: tl.constexpr, S: tl.constexpr,
    ):
        # register tiles are (T, NP, BLOCK_D): channels fastest, so the default layout puts channels across
        # lanes and keeps the chunk's steps (and states) in each thread's registers: the scan runs in-thread
        pid_d, pid_b = tl.program_id(0), tl.program_id(1)
        group, offs_d, mask_d = _channel_block(pid_d, channels_per_group, BLOCK_D)
        offs_n = tl.arange(0, NP)
        mask_n = offs_n < d_state
        offs_t = tl.arange(0, T)
        mask_nd = mask_n[:, None] & mask_d[None, :]

        # exp(delta A) = exp2(delta A log2 e)
        A2 = tl.load(A_ptr + offs_d[None, :] * d_state + offs_n[:, None], mask=mask_nd,
                     other=0.).to(tl.float32) * 1.4426950408889634
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)

        b64 = pid_b.to(tl.int64)
        d64 = offs_d[None, :].to(tl.int64)
        u_base = u_ptr + b64 * stride_u_b + d64 * stride_u_d
        dt_base = delta_ptr + b64 * stride_dt_b + d64 * stride_dt_d
        z_base = z_ptr + b64 * stride_z_b + d64 * stride_z_d
        out_base = out_ptr + (b64 * channels + d64) * seqlen
        B_base = B_ptr + b64 * stride_B_b + group * stride_B_g + offs_n[None, :] * stride_B_n
        C_base = C_ptr + b64 * stride_C_b + group * stride_C_g + offs_n[None, :] * stride_C_n
        # states at every S-th step (the backward's chunk starts): (b, Dc, cdiv(L, S), NP)
        num_saved = tl.cdiv(seqlen, S)
        st_base = states_ptr + ((b64 * channels + d64) * num_saved) * NP + offs_n[:, None]

        h = tl.zeros((NP, BLOCK_D), dtype=tl.float32)
        for c in range(num_chunks):
            if SAVE_STATES:
                tl.store(st_base + c * (T // S) * NP, h, mask=mask_d[None, :])
            t = c * T + offs_t
            mask_t = t < seqlen
            mask = mask_t[:, None] & mask_d[None, :]
            u = tl.load(u_base + t[:, None], mask=mask, other=0.).to(tl.float32)
            dt = tl.load(dt_base + t[:, None], mask=mask, other=0.).to(tl.float32)
            if HAS_BIAS:
                dt += bias[None, :]
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(mask, dt, 0.)  # padded steps: decay 1, input 0
            mask_tn = mask_t[:, None] & mask_n[None, :]
            Bt = tl.load(B_base + t[:, None], mask=mask_tn, other=0.).to(tl.float32)
            Ct = tl.load(C_base + t[:, None], mask=mask_tn, other=0.).to(tl.float32)

            a = tl.exp2(dt[:, None, :] * A2[None, :, :])  # (T, NP, BLOCK_D)
            x = (dt * u)[:, None, :] * Bt[:, :, None]
            # the chunk's first step takes the carried state: h_0 = a_0 h_prev + x_0
            x = tl.where(offs_t[:, None, None] == 0, x + a * h[None, :, :], x)
            _, hs = tl.associative_scan((a, x), 0, _combine)
            h = tl.sum(tl.where(offs_t[:, None, None] == T - 1, hs, 0.), axis=0)
            if SAVE_STATES:
                for j in tl.static_range(1, T // S):
                    hj = tl.sum(tl.where(offs_t[:, None, None] == j * S - 1, hs, 0.), axis=0)
                    idx = c * (T // S) + j
                    tl.store(st_base + idx * NP, hj, mask=mask_d[None, :] & (idx < num_saved))

            y = tl.sum(hs * Ct[:, :, None], axis=1)  # (T, BLOCK_D)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                zv = tl.load(z_base + t[:, None], mask=mask, other=0.).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_base + t[:, None], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scan_bwd_kernel(
            u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr,
            du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
            stride_u_b, stride_u_d, stride_dt_b, stride_dt_d, stride_z_b, stride_z_d, stride_do_b, stride_do_d,
            stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
            seqlen, channels, channels_per_group, d_state, num_chunks, num_blocks,
            NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
            HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        pid_d, pid_b = tl.program_id(0), tl.program_id(1)
        group, offs_d, mask_d = _channel_block(pid_d, channels_per_group, BLOCK_D)
        offs_n = tl.arange(0, NP)
        mask_n = offs_n < d_state
        offs_t = tl.arange(0, T)
        mask_nd = mask_n[:, None] & mask_d[None, :]

        A = tl.load(A_ptr + offs_d[None, :] * d_state + offs_n[:, None], mask=mask_nd, other=0.).to(tl.float32)
        A2 = A * 1.4426950408889634
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)

        b64 = pid_b.to(tl.int64)
        d64 = offs_d[None, :].to(tl.int64)
        u_base = u_ptr + b64 * stride_u_b + d64 * stride_u_d
        dt_base = delta_ptr + b64 * stride_dt_b + d64 * stride_dt_d
        z_base = z_ptr + b64 * stride_z_b + d64 * stride_z_d
        do_base = dout_ptr + b64 * stride_do_b + d64 * stride_do_d
        out_off = (b64 * channels + d64) * seqlen  # du, ddelta, dz: contiguous (b, Dc, L)
        B_base = B_ptr + b64 * stride_B_b + group * stride_B_g + offs_n[None, :] * stride_B_n
        C_base = C_ptr + b64 * stride_C_b + group * stride_C_g + offs_n[None, :] * stride_C_n
        st_base = states_ptr + ((b64 * channels + d64) * num_chunks) * NP + offs_n[:, None]
        # dB, dC partials: (b, num_blocks, NP, L) fp32, one slice per program
        part_base = ((b64 * num_blocks + pid_d) * NP + offs_n[None, :]) * seqlen

        first = offs_t[:, None, None] == 0
        last = offs_t[:, None, None] == T - 1
        lam_next = tl.zeros((NP, BLOCK_D), dtype=tl.float32)  # lam at the first step of the later chunk
        dA_acc = tl.zeros((NP, BLOCK_D), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for ci in range(num_chunks):
            c = num_chunks - 1 - ci
            t = c * T + offs_t
            mask_t = t < seqlen
            mask = mask_t[:, None] & mask_d[None, :]
            u = tl.load(u_base + t[:, None], mask=mask, other=0.).to(tl.float32)
            dt_raw = tl.load(dt_base + t[:, None], mask=mask, other=0.).to(tl.float32)
            # delta one step later: the adjoint's decay a_{t+1}
            mask1 = (t + 1 < seqlen)[:, None] & mask_d[None, :]
            dt1 = tl.load(dt_base + t[:, None] + 1, mask=mask1, other=0.).to(tl.float32)
            if HAS_BIAS:
                dt_raw += bias[None, :]
                dt1 += bias[None, :]
            if SOFTPLUS:
                dt = _softplus(dt_raw)
                dt1 = _softplus(dt1)
            else:
                dt = dt_raw
            dt = tl.where(mask, dt, 0.)
            dt1 = tl.where(mask1, dt1, 0.)
            mask_tn = mask_t[:, None] & mask_n[None, :]
            Bt = tl.load(B_base + t[:, None], mask=mask_tn, other=0.).to(tl.float32)
            Ct = tl.load(C_base + t[:, None], mask=mask_tn, other=0.).to(tl.float32)

            # recompute the chunk's states from its saved start
            h0 = tl.load(st_base + c * NP, mask=mask_d[None, :], other=0.)
            a = tl.exp2(dt[:, None, :] * A2[None, :, :])
            dtu = dt * u
            x = dtu[:, None, :] * Bt[:, :, None]
            _, hs = tl.associative_scan((a, tl.where(first, x + a * h0[None, :, :], x)), 0, _combine)

            dout = tl.load(do_base + t[:, None], mask=mask, other=0.).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_base + t[:, None], mask=mask, other=0.).to(tl.float32)
                sz = tl.sigmoid(zv)
                g = dout * zv * sz
                y = tl.sum(hs * Ct[:, :, None], axis=1)
                if HAS_D:
                    y += Dv[None, :] * u
                dz = dout * y * sz * (1. + zv * (1. - sz))
                tl.store(dz_ptr + out_off + t[:, None], dz.to(dz_ptr.dtype.element_ty), mask=mask)
            else:
                g = dout

            # adjoint: lam_t = C_t g_t + a_{t+1} lam_{t+1}, the chunk's last step takes the later chunk's lam
            a1 = tl.exp2(dt1[:, None, :] * A2[None, :, :])
            beta = g[:, None, :] * Ct[:, :, None]
            beta = tl.where(last, beta + a1 * lam_next[None, :, :], beta)
            _, lam = tl.associative_scan((a1, beta), 0, _combine, reverse=True)
            lam_next = tl.sum(tl.where(first, lam, 0.), axis=0)

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
            tl.store(du_ptr + out_off + t[:, None], du.to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(ddelta_ptr + out_off + t[:, None], ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)

            dB = tl.sum(lam * dtu[:, None, :], axis=2)  # (T, NP); masked channels have dt = 0
            dC = tl.sum(hs * g[:, None, :], axis=2)  # masked channels have g = 0
            tl.store(dB_ptr + part_base + t[:, None], dB, mask=mask_t[:, None])
            tl.store(dC_ptr + part_base + t[:, None], dC, mask=mask_t[:, None])

        row = b64 * channels + offs_d
        tl.store(dA_ptr + row[None, :] * NP + offs_n[:, None], dA_acc, mask=mask_nd)
        if HAS_D:
            tl.store(dD_ptr + row, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + row, dbias_acc, mask=mask_d)


_last_kernels = {}  # the latest compiled kernels, for benchmarks (registers, spills)


def _lastdim_contiguous(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _num_blocks(channels: int, groups: int, block_d: int) -> int:
    return groups * math.ceil(channels // groups / block_d)


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg: ScanConfig, save_states: bool):
    batch, channels, seqlen = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    np_ = _pow2(d_state)
    num_chunks = triton.cdiv(seqlen, cfg.T)
    if cfg.T % cfg.T_bwd:
        raise ValueError(f'selective_scan_triton: T_bwd {cfg.T_bwd} must divide T {cfg.T}')
    out = torch.empty((batch, channels, seqlen), device=u.device, dtype=u.dtype)
    states = torch.empty((batch, channels, triton.cdiv(seqlen, cfg.T_bwd), np_) if save_states else (1,),
                         device=u.device, dtype=torch.float32)
    zz = z if z is not None else u
    grid = (_num_blocks(channels, groups, cfg.block_d_fwd), batch)
    _last_kernels['fwd'] = _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, out, states,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        seqlen, channels, channels // groups, d_state, num_chunks,
        NP=np_, BLOCK_D=cfg.block_d_fwd, T=cfg.T,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        SAVE_STATES=save_states, S=cfg.T_bwd, num_warps=cfg.warps_fwd,
    )
    return out, states


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, cfg: ScanConfig):
    batch, channels, seqlen = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    np_ = _pow2(d_state)
    num_chunks = triton.cdiv(seqlen, cfg.T_bwd)
    num_blocks = _num_blocks(channels, groups, cfg.block_d_bwd)
    dev = u.device
    du = torch.empty((batch, channels, seqlen), device=dev, dtype=u.dtype)
    ddelta = torch.empty((batch, channels, seqlen), device=dev, dtype=delta.dtype)
    dz = torch.empty((batch, channels, seqlen), device=dev, dtype=z.dtype) if z is not None else None
    dA = torch.empty((batch, channels, np_), device=dev, dtype=torch.float32)
    dD = torch.empty((batch, channels), device=dev, dtype=torch.float32) if D is not None else None
    dbias = torch.empty((batch, channels), device=dev, dtype=torch.float32) if delta_bias is not None else None
    dB = torch.empty((batch, num_blocks, np_, seqlen), device=dev, dtype=torch.float32)
    dC = torch.empty_like(dB)
    zz = z if z is not None else u
    grid = (num_blocks, batch)
    _last_kernels['bwd'] = _scan_bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, dout, states,
        du, ddelta, dz if dz is not None else du, dA, dD if dD is not None else dA,
        dbias if dbias is not None else dA, dB, dC,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
        dout.stride(0), dout.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        seqlen, channels, channels // groups, d_state, num_chunks, num_blocks,
        NP=np_, BLOCK_D=cfg.block_d_bwd, T=cfg.T_bwd,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        num_warps=cfg.warps_bwd,
    )
    dA = dA.sum(0)[:, :d_state]
    dB = dB.view(batch, groups, num_blocks // groups, np_, seqlen).sum(2)[:, :, :d_state]
    dC = dC.view(batch, groups, num_blocks // groups, np_, seqlen).sum(2)[:, :, :d_state]
    return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)


class _SelectiveScanTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg):
        u, delta, B, C, z = (_lastdim_contiguous(t) for t in (u, delta, B, C, z))
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        save = any(ctx.needs_input_grad[:8])
        out, states = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg, save)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus, ctx.cfg = delta_softplus, cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        grads = _backward(_lastdim_contiguous(dout), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                          states, ctx.cfg)
        return grads + (None, None)


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
    """Triton selective scan with fp32 state; output in u's dtype, gradients in each input's dtype."""
    if not has_triton:
        raise RuntimeError('timm_arm: the triton selective scan needs triton installed')
    batch, channels, seqlen = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    if channels % groups:
        raise ValueError(f'selective_scan: {channels} channels cannot be split into {groups} groups of B/C')
    if B.shape != (batch, groups, d_state, seqlen) or C.shape != B.shape:
        raise ValueError(f'selective_scan: B, C must be {(batch, groups, d_state, seqlen)}, got {B.shape}, {C.shape}')
    cfg = config or scan_config(channels // groups, seqlen, d_state)
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg)
