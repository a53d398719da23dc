""" Selective scan (Mamba-1 S6) over several scan directions stacked along channels.

Shapes, as in mamba-ssm's ``selective_scan_fn``:
    u, delta, z:   (batch, K*d, L)      K directions stacked along channels
    A:             (K*d, N)
    B, C:          (batch, G, N, L)     G groups; channel c reads group c // (K*d // G)
    D, delta_bias: (K*d,)

    delta  = softplus(delta + delta_bias)                  (when delta_softplus)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t    = <h_t, C_t> + D * u_t,   y_t *= silu(z_t)      (when z is given)

Three implementations live here: the plain-PyTorch one (any device, fp32 state, its own backward), the literal
step-by-step reference it is tested against, and the mamba-ssm CUDA kernel wrapper. ``timm_arm.ops.dispatch`` picks
between them.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .cpu_compile import CompiledOnCpu

__all__ = ['selective_scan_torch', 'selective_scan_sequential', 'selective_scan_cuda_fn', 'SequentialScan']


def _check_groups(dim: int, groups: int) -> None:
    if dim % groups:
        raise ValueError(f'selective_scan: {dim} channels cannot be split into {groups} groups of B/C')


def _discretised_delta(delta: torch.Tensor, delta_bias: Optional[torch.Tensor], delta_softplus: bool) -> torch.Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor]):
    """y + D * u, gated by silu(z), in u's dtype."""
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def _advance(h, x, delta, A, B):
    """One step of the recurrence: exp(delta A) h + x B."""
    return torch.exp(delta * A) * h + x * B


def _advance_and_read(h, x, delta, A, B, C, y):
    """One step, and its output <h, C> into y."""
    h = _advance(h, x, delta, A, B)
    y.copy_((h * C).sum(-1))
    return h


def _step_back(g, h, h_prev, dy, x, delta, A, B, C, dA, dC, dx, dB, d_delta):
    """One step of the backward, walking in reverse: from g = dL/dh_t (before y_t's term), returns dL/dh_(t-1);
    writes dC_t, dx_t, dB_t, d(delta)_t and adds dA's term (``SequentialScan.backward``'s eager loop, functional)."""
    g = g + dy * C  # y_t = <h_t, C_t>
    dC.copy_((h * dy).sum(-2))
    dx.copy_((g * B).sum(-1))  # h_t = ... + x_t B_t
    dB.copy_((g * x).sum(-2))
    decay = torch.exp(delta * A)
    d_exponent = g * h_prev * decay  # d / d(delta_t A) of h_t = exp(delta_t A) h_(t-1)
    d_delta.copy_((d_exponent * A).sum(-1))
    dA.add_(d_exponent * delta)
    return g * decay


_ADVANCE, _ADVANCE_AND_READ = CompiledOnCpu(_advance), CompiledOnCpu(_advance_and_read)
_STEP_BACK = CompiledOnCpu(_step_back)


def _run_steps(h, x, delta, A, B, C=None, y=None, states=None) -> torch.Tensor:
    """The recurrence over the steps of x from state h (left as it is); returns the final state. y_t = <h_t, C_t>
    into y; states collects the state before each step.

    h: (G, b, d_g, N); x, delta: (G, T, b, d_g, 1); A: (G, 1, d_g, N); B, C: (G, T, b, 1, N); y: (T, G, b, d_g).
    On CPUs each step is one compiled loop (``cpu_compile``); else, in place, every temporary in two preallocated
    buffers (allocations cost as much as the arithmetic here).
    """
    step = _ADVANCE if y is None else _ADVANCE_AND_READ
    if step.active(h):
        for t in range(x.shape[1]):
            if states is not None:
                states.append(h)
            if y is None:
                h = step(h, x[:, t], delta[:, t], A, B[:, t])
            else:
                h = step(h, x[:, t], delta[:, t], A, B[:, t], C[:, t], y[t])
        return h
    h = h.clone()
    decay, product = torch.empty_like(h), torch.empty_like(h)
    for t in range(x.shape[1]):
        if states is not None:
            states.append(h.clone())
        torch.mul(delta[:, t], A, out=decay).exp_()
        h.mul_(decay).addcmul_(x[:, t], B[:, t])
        if y is not None:
            torch.sum(torch.mul(h, C[:, t], out=product), dim=-1, out=y[t])
    return h


class SequentialScan(torch.autograd.Function):
    """y = scan(u, delta, A, B, C) in direction-major layout (delta after bias and softplus; no D, no gate), fp32,
    forward and backward written out.

    u, delta: (G, L, b, d_g) contiguous; A: (G, d_g, N); B, C: (G, L, b, N) contiguous -> y: (L, G, b, d_g).
    Group g (a scan direction) reads B / C of group g. The state of one step (G, b, d_g, N) stays in the CPU's caches:
    one pass over it per operation and step, where a parallel scan would stream (b, D, L, N) tensors through memory
    several times. Backward keeps the inputs and the state at every segment start (about sqrt(L) of them), re-runs
    each segment's steps, then walks it in reverse.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        groups, seqlen, batch, d = u.shape
        segment = math.isqrt(seqlen) + 1
        x, dl, A_ = (delta * u).unsqueeze(-1), delta.unsqueeze(-1), A.unsqueeze(1)
        h = u.new_zeros(groups, batch, d, A.shape[-1])
        y = u.new_empty(seqlen, groups, batch, d)
        keep = any(ctx.needs_input_grad)
        starts = []
        for s in range(0, seqlen, segment):
            if keep:
                starts.append(h)
            e = s + segment
            h = _run_steps(h, x[:, s:e], dl[:, s:e], A_, B[:, s:e].unsqueeze(-2), C[:, s:e].unsqueeze(-2), y[s:e])
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        ctx.segment = segment
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, *starts = ctx.saved_tensors
        groups, seqlen, batch, d = u.shape
        x, dl, A_ = (delta * u).unsqueeze(-1), delta.unsqueeze(-1), A.unsqueeze(1)
        B_, C_ = B.unsqueeze(-2), C.unsqueeze(-2)
        dy = dy.contiguous().unsqueeze(-1)  # (L, G, b, d_g, 1)
        g = torch.zeros_like(starts[0])  # dL / dh of the step being walked
        decay, d_exponent, product = torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)
        dx, d_dl = u.new_empty(seqlen, groups, batch, d), u.new_empty(seqlen, groups, batch, d)
        dB, dC = B.new_empty(seqlen, groups, batch, B.shape[-1]), C.new_empty(seqlen, groups, batch, C.shape[-1])
        dA = torch.zeros_like(g)  # summed over the batch at the end
        for i in reversed(range(len(starts))):
            s, e = i * ctx.segment, min(seqlen, (i + 1) * ctx.segment)
            states = []  # states[j]: the state before step s + j; then the state after the segment's last step
            states.append(_run_steps(starts[i], x[:, s:e], dl[:, s:e], A_, B_[:, s:e], states=states))
            if _STEP_BACK.active(g):
                for t in reversed(range(s, e)):
                    g = _STEP_BACK(g, states[t - s + 1], states[t - s], dy[t], x[:, t], dl[:, t], A_, B_[:, t],
                                   C_[:, t], dA, dC[t], dx[t], dB[t], d_dl[t])
                continue
            for t in reversed(range(s, e)):
                h_t, h_prev = states[t - s + 1], states[t - s]
                g.addcmul_(dy[t], C_[:, t])  # y_t = <h_t, C_t>
                torch.sum(torch.mul(h_t, dy[t], out=product), dim=-2, out=dC[t])
                torch.sum(torch.mul(g, B_[:, t], out=product), dim=-1, out=dx[t])  # h_t = ... + x_t B_t
                torch.sum(torch.mul(g, x[:, t], out=product), dim=-2, out=dB[t])
                torch.mul(dl[:, t], A_, out=decay).exp_()
                torch.mul(g, h_prev, out=d_exponent).mul_(decay)  # d / d(delta_t A) of h_t = exp(delta_t A) h_(t-1)
                torch.sum(torch.mul(d_exponent, A_, out=product), dim=-1, out=d_dl[t])
                dA.addcmul_(d_exponent, dl[:, t])
                g.mul_(decay)
        dx, d_dl = dx.transpose(0, 1), d_dl.transpose(0, 1)  # (G, L, b, d_g), as u and delta
        return dx * delta, d_dl + dx * u, dA.sum(1), dB.transpose(0, 1), dC.transpose(0, 1)


def selective_scan_torch(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor] = None,
        z: Optional[torch.Tensor] = None,
        delta_bias: Optional[torch.Tensor] = None,
        delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan in plain PyTorch (any device, fp32 state), in mamba-ssm's channel-first layout: the recurrence
    is ``SequentialScan`` on direction-major copies of the inputs (the mixer's PyTorch path feeds it that layout
    directly); bias, softplus, the D skip and the gate are ordinary autograd ops around it.
    """
    batch, dim, seqlen = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    _check_groups(dim, groups)
    delta = _discretised_delta(delta, delta_bias, delta_softplus)

    def direction_major(t: torch.Tensor) -> torch.Tensor:  # (b, G * n, L) -> (G, L, b, n)
        return t.float().reshape(batch, groups, -1, seqlen).permute(1, 3, 0, 2).contiguous()

    y = SequentialScan.apply(direction_major(u), direction_major(delta), A.float().view(groups, -1, d_state),
                             direction_major(B.flatten(1, 2)), direction_major(C.flatten(1, 2)))
    y = y.permute(2, 1, 3, 0).reshape(batch, dim, seqlen)  # (L, G, b, d_g) -> (b, G * d_g, L)
    return _skip_and_gate(y, u, D, z)


def selective_scan_sequential(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor] = None,
        z: Optional[torch.Tensor] = None,
        delta_bias: Optional[torch.Tensor] = None,
        delta_softplus: bool = False,
) -> torch.Tensor:
    """The plain one-step-at-a-time recurrence: the reference the fast paths are tested against."""
    batch, dim, seqlen = u.shape
    groups = B.shape[1]
    _check_groups(dim, groups)
    shape = (batch, groups, dim // groups, seqlen, 1)  # channels split into their B/C groups; N last
    delta = _discretised_delta(delta, delta_bias, delta_softplus).view(shape)
    decay = torch.exp(delta * A.float().view(1, groups, dim // groups, 1, -1))
    inputs = delta * u.float().view(shape) * B.float().transpose(-1, -2).unsqueeze(2)
    C = C.float().transpose(-1, -2).unsqueeze(2)
    state = torch.zeros_like(inputs[..., 0, :])
    ys = []
    for t in range(seqlen):
        state = decay[..., t, :] * state + inputs[..., t, :]
        ys.append((state * C[..., t, :]).sum(-1))
    return _skip_and_gate(torch.stack(ys, dim=-1).reshape(batch, dim, seqlen), u, D, z)


class _SelectiveScanCuda(torch.autograd.Function):
    """mamba-ssm's selective_scan_cuda extension, imported directly (``import mamba_ssm`` pulls transformers)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        import selective_scan_cuda
        u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
        if z is not None and z.stride(-1) != 1:
            z = z.contiguous()
        out, scan_states, *rest = selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.delta_softplus = delta_softplus
        ctx.has_z = z is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, scan_states, out if z is not None else None)
        return rest[0] if z is not None else out

    @staticmethod
    def backward(ctx, dout):
        import selective_scan_cuda
        u, delta, A, B, C, D, z, delta_bias, scan_states, out = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = selective_scan_cuda.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout, scan_states, out, None, ctx.delta_softplus, False)
        dz = rest[0] if ctx.has_z else None
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                ddelta_bias if delta_bias is not None else None, None)


def selective_scan_cuda_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    return _SelectiveScanCuda.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
