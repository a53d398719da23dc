""" Selective scan (Mamba-1 S6) over several scan directions stacked along channels.

Shapes, as in mamba-ssm's ``selective_scan_fn``:
    u, delta, z:   (batch, K*d, L)      K directions stacked along channels
    A:             (K*d, N)
    B, C:          (batch, G, N, L)     G groups; channel c reads group c // (K*d // G)
    D, delta_bias: (K*d,)

    delta  = softplus(delta + delta_bias)                  (when delta_softplus)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t    = <h_t, C_t> + D * u_t,   y_t *= silu(z_t)      (when z is given)

Two implementations live here: the plain-PyTorch one (any device, autograd, fp32 state) and the
mamba-ssm CUDA kernel wrapper. ``timm_arm.ops.dispatch`` picks between them.
"""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['selective_scan_torch', 'selective_scan_sequential', 'selective_scan_cuda_fn']


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


def _time_major(x: torch.Tensor, num_chunks: int, chunk_size: int) -> torch.Tensor:
    """(b, C, L) -> (T, chunks, b, C), zero-padded to chunks * T steps; position = chunk * T + t."""
    batch, channels, seqlen = x.shape
    x = F.pad(x, (0, num_chunks * chunk_size - seqlen))
    return x.view(batch, channels, num_chunks, chunk_size).permute(3, 2, 0, 1)


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
        chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Chunked parallel selective scan in plain PyTorch (fp32 state, differentiable by autograd).

    The sequence is cut into chunks of T steps. All chunks are scanned at once from a zero state
    (T vectorised steps), the chunk-end states are carried across chunks (L/T steps), then every position
    adds the carried state times the decay accumulated since its chunk started. Each decay factor is a
    product of exp(delta * A) <= 1, so nothing overflows. About 2*sqrt(L) steps replace the L steps of a
    sequential loop. The state is laid out (T, chunks, b, N, G, d_g) so that every step works on one
    contiguous slice and broadcasts run along the long channel axis.
    """
    batch, dim, seqlen = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    _check_groups(dim, groups)
    T = chunk_size or max(1, int(round(seqlen ** 0.5)))
    num_chunks = -(-seqlen // T)
    delta = _discretised_delta(delta, delta_bias, delta_softplus)
    # padded steps get delta = 0 (decay 1, input 0): after the sequence end they change nothing before it
    lead = (T, num_chunks, batch)
    delta_t = _time_major(delta, num_chunks, T).reshape(lead + (1, groups, dim // groups))
    delta_u = _time_major(delta * u.float(), num_chunks, T).reshape(lead + (1, groups, dim // groups))
    B_t = _time_major(B.float().flatten(1, 2), num_chunks, T).reshape(lead + (groups, d_state)).transpose(-1, -2)
    C_t = _time_major(C.float().flatten(1, 2), num_chunks, T).reshape(lead + (groups, d_state)).transpose(-1, -2)
    A_t = A.float().view(groups, dim // groups, d_state).permute(2, 0, 1)  # (N, G, d_g)

    # 1) scan inside every chunk from a zero state, all chunks at once, reading out <h, C> as we go and tracking
    #    the decay since the chunk start. unbind, not indexing: its backward is one stack, not a zero-filled full
    #    tensor per step; no (b, D, L, N) tensor is ever stacked.
    decay = (delta_t * A_t).exp().unbind(0)
    steps = (delta_u * B_t.unsqueeze(-1)).unbind(0)
    C_steps = C_t.unsqueeze(-1).unbind(0)
    state, decay_since_start = steps[0], decay[0]
    y_local, decays = [(state * C_steps[0]).sum(2)], [decay_since_start]
    for t in range(1, T):
        state = decay[t] * state + steps[t]
        decay_since_start = decay[t] * decay_since_start
        y_local.append((state * C_steps[t]).sum(2))
        decays.append(decay_since_start)

    # 2) carry the chunk-end states across chunks
    chunk_decay, chunk_end = decay_since_start.unbind(0), state.unbind(0)
    carry = torch.zeros_like(chunk_end[0])
    carries = []
    for c in range(num_chunks):
        carries.append(carry)
        carry = chunk_decay[c] * carry + chunk_end[c]
    carries = torch.stack(carries)  # state entering each chunk: (chunks, b, N, G, d_g)

    # 3) every position adds the carried state decayed to it: y_t += <decay_t * carry, C_t>
    y = torch.stack([y_local[t] + (decays[t] * carries * C_steps[t]).sum(2) for t in range(T)])  # (T, chunks, b, G, dg)
    y = y.reshape(T, num_chunks * batch * dim).t().reshape(num_chunks, batch, dim, T)
    y = y.permute(1, 2, 0, 3).reshape(batch, dim, num_chunks * T)[..., :seqlen]
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
