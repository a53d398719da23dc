""" The Triton kernels against plain references: the selective scan (channel-first and token-major with scan orders,
every tile configuration), the causal conv, the SwiGLU and add + LayerNorm kernels, the one-node mixer and MLP, and
whole models: outputs and every gradient.

Without a CUDA device the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton); with one, on the GPU. Each case is its own test; a failure prints the worst error.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='triton is not installed')

if importlib.util.find_spec('triton') is not None:
    from timm_arm.ops.causal_conv1d import causal_conv1d_silu_torch
    from timm_arm.ops.selective_scan import selective_scan_sequential
    from timm_arm.ops.triton import selective_scan as selective_scan_triton
    from timm_arm.ops.triton import selective_scan_tokens
    from timm_arm.ops.triton.conv import conv_backward, conv_forward
    from timm_arm.ops.triton.scan import ScanConfig, scan_config
    from timm_arm.ops.triton.scan_backward import _lane_tile
    from timm_arm.ops.triton.utils import pow2

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
HERE = os.path.dirname(os.path.abspath(__file__))
# the model-level checks test the wiring (orders, projections, autograd nodes); in the interpreter they take 8 states,
# which keeps the backward off the lane reduce-scatter tile: its reduce runs a Python call per element there (minutes
# per model). That tile has its own checks below (test_scan_lane_reduce_scatter*); on a GPU the models take ARM's 16.
MODEL_D_STATE = 8 if INTERPRETED else 16

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def make_inputs(batch, groups, d, seqlen, d_state, device, seed):
    g = torch.Generator().manual_seed(seed)
    dim = groups * d
    mk = lambda *s, scale=1.: (torch.randn(*s, generator=g) * scale).to(device)
    return dict(u=mk(batch, dim, seqlen), delta=mk(batch, dim, seqlen, scale=.5),
                A=(-(torch.rand(dim, d_state, generator=g) * 4 + .1)).to(device),
                B=mk(batch, groups, d_state, seqlen), C=mk(batch, groups, d_state, seqlen),
                D=mk(dim), z=mk(batch, dim, seqlen), delta_bias=mk(dim, scale=.5))


def rel_err(a, b):
    # max abs error over the largest reference magnitude; where the reference is exactly zero (dA at L = 1:
    # no earlier state), the plain max abs error
    scale = b.float().abs().max().item()
    return (a.float() - b.float()).abs().max().item() / (scale if scale > 0 else 1.)


def check(shape, options, device, config=None, seed=0, tol=1e-5):
    batch, groups, d, seqlen, d_state = shape
    t = make_inputs(batch, groups, d, seqlen, d_state, device, seed)
    softplus = 'softplus' in options
    for name in ('D', 'z', 'delta_bias'):
        if name not in options:
            t[name] = None
    leaves = [k for k in NAMES if t[k] is not None]
    for k in leaves:
        t[k].requires_grad_()
    grad = torch.randn(batch, groups * d, seqlen, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    results = []
    config = ScanConfig(**config) if config else None
    for fn, kw in ((selective_scan_triton, dict(config=config)), (selective_scan_sequential, {})):
        out = fn(**t, delta_softplus=softplus, **kw)
        results.append((out, torch.autograd.grad(out, [t[k] for k in leaves], grad)))
    errs = {'out': rel_err(results[0][0], results[1][0])}
    errs.update({k: rel_err(a, b) for k, a, b in zip(leaves, results[0][1], results[1][1])})
    worst = max(errs, key=errs.get)
    ok = errs[worst] < tol and all(a.dtype == b.dtype for a, b in zip(results[0][1], results[1][1]))
    print(f'{"ok  " if ok else "FAIL"} shape={shape} options={sorted(options)} config={config} '
          f'worst={worst} {errs[worst]:.2e}', flush=True)
    return ok


CASES = [
    # (batch, groups, channels per group, L, N), options
    ((1, 1, 4, 1, 4), {'D', 'z', 'delta_bias', 'softplus'}),
    ((2, 2, 3, 7, 4), {'D', 'z', 'delta_bias', 'softplus'}),
    ((1, 4, 2, 50, 8), {'D', 'z', 'delta_bias', 'softplus'}),
    ((1, 1, 4, 50, 4), set()),
    ((1, 2, 4, 33, 5), {'z'}),  # N not a power of two
    ((1, 2, 2, 197, 16), {'D', 'delta_bias', 'softplus'}),
]
# tile configurations besides the default (None): one chunk per segment, and 3-chunk segments
CONFIGS = {
    'default': None,
    'T16-seg1': dict(T=16, block_d_fwd=2, warps_fwd=1, T_bwd=4, block_d_bwd=4, warps_bwd=1, chunks_per_segment=1),
    'T4-seg3': dict(T=4, block_d_fwd=4, warps_fwd=2, T_bwd=8, block_d_bwd=2, warps_bwd=1, chunks_per_segment=3),
}


def _orders(num_dirs, seqlen, gen, permute):
    if not permute:
        return None, None
    order = torch.stack([torch.randperm(seqlen, generator=gen) for _ in range(num_dirs)])
    return order, torch.argsort(order, dim=1)


def _gather_steps(x, order):
    """(b, K, L, c) token-major -> the same in scan order of each direction."""
    return x.gather(2, order[None, :, :, None].expand_as(x)) if order is not None else x


def scan_tokens_reference(u, delta, A, B, C, D, delta_bias, order, inverse):
    """The PyTorch scan on explicitly permuted channel-first copies, mapped back to token order."""
    batch, num_dirs, seqlen, d = u.shape
    cf = lambda t: _gather_steps(t, order).permute(0, 1, 3, 2)  # (b, K, c, L) in scan order
    y = selective_scan_sequential(
        cf(u).reshape(batch, num_dirs * d, seqlen), cf(delta).reshape(batch, num_dirs * d, seqlen),
        A.reshape(num_dirs * d, -1), cf(B), cf(C), D.reshape(-1) if D is not None else None, None,
        delta_bias.reshape(-1) if delta_bias is not None else None, delta_softplus=True)
    y = y.view(batch, num_dirs, d, seqlen).permute(0, 1, 3, 2)
    return _gather_steps(y, inverse)


# (batch, directions, L, d, N): 16 channels over 3 segments (8 steps each), and 40 (a masked third block) with 13
# states (3 padded)
SCATTER_CASES = [(1, 1, 19, 16, 16), (1, 1, 5, 40, 13)]
# the same tile with the first backward pass inside the backward kernel, 2-chunk segments
IN_KERNEL_STATES = dict(T=4, block_d_fwd=16, warps_fwd=1, T_bwd=2, block_d_bwd=16, warps_bwd=1,
                        chunks_per_segment=2, states_in_forward_kernel=False)


def check_tokens(shape, permute, device, dtype=torch.float32, config=None, seed=0, tol=1e-5):
    """Token-major scan with per-direction orders, strided B / C views of one projection, all gradients."""
    batch, num_dirs, seqlen, d, d_state = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.: (torch.randn(*s, generator=g) * scale).to(device)
    x_dbl = mk(batch, num_dirs, seqlen, 3 + 2 * d_state)
    t = dict(u=mk(batch, seqlen, num_dirs, d).transpose(1, 2), delta=mk(batch, num_dirs, seqlen, d, scale=.5),
             A=(-(torch.rand(num_dirs, d, d_state, generator=g) * 4 + .1)).to(device),
             B=x_dbl[..., 3:3 + d_state], C=x_dbl[..., 3 + d_state:], D=mk(num_dirs, d),
             delta_bias=mk(num_dirs, d, scale=.5))
    for k in ('u', 'delta', 'B', 'C'):
        t[k] = t[k].to(dtype)
    order, inverse = _orders(num_dirs, seqlen, g, permute)
    order, inverse = (o.to(device) if o is not None else None for o in (order, inverse))
    leaves = list(t)
    t = {k: v.detach().requires_grad_() for k, v in t.items()}
    dy = mk(batch, num_dirs, seqlen, d)
    config = ScanConfig(**config) if config else None
    out = selective_scan_tokens(**t, delta_softplus=True, order=order, config=config)
    grads = torch.autograd.grad(out, [t[k] for k in leaves], dy.to(out.dtype))
    ref_in = {k: v.float() for k, v in t.items()}
    ref = scan_tokens_reference(**ref_in, order=order, inverse=inverse)
    ref_grads = torch.autograd.grad(ref, [ref_in[k] for k in leaves], dy)
    errs = {'out': rel_err(out, ref)}
    errs.update({k: rel_err(a, b) for k, a, b in zip(leaves, grads, ref_grads)})
    worst = max(errs, key=errs.get)
    ok = errs[worst] < tol and out.dtype == dtype and all(a.dtype == t[k].dtype for k, a in zip(leaves, grads))
    print(f'{"ok  " if ok else "FAIL"} tokens shape={shape} permuted={permute} {dtype} config={config} '
          f'worst={worst} {errs[worst]:.2e}', flush=True)
    return ok


def check_conv(shape, permute, device, dtype=torch.float32, seed=0, tol=1e-5):
    """Token-major causal conv + SiLU along per-direction orders (the conv kernels' host functions): output and the
    gradients of x, weight, bias."""
    batch, num_dirs, seqlen, d, width = shape
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, seqlen, 2 * d, generator=g).to(device, dtype)
    w = (torch.randn(num_dirs, d, width, generator=g) * .5).to(device)
    bias = torch.randn(num_dirs, d, generator=g).to(device)
    order, inverse = _orders(num_dirs, seqlen, g, permute)
    order, inverse = (o.to(device) if o is not None else None for o in (order, inverse))
    du = torch.randn(batch, num_dirs, seqlen, d, generator=g).to(device)
    kernel_order = [o.int().contiguous() if o is not None else None for o in (order, inverse)]
    out = conv_forward(xz[..., :d], w, bias, kernel_order[0])
    grads = conv_backward(du.to(out.dtype), xz[..., :d], w, bias, *kernel_order)
    xr = xz.detach().float().requires_grad_()
    wr, br = w.detach().requires_grad_(), bias.detach().requires_grad_()
    xs = _gather_steps(xr[..., :d].unsqueeze(1).expand(batch, num_dirs, seqlen, d), order)
    ref = causal_conv1d_silu_torch(xs.permute(0, 1, 3, 2).reshape(batch, num_dirs * d, seqlen),
                                   wr.reshape(num_dirs * d, width), br.reshape(-1))
    ref = _gather_steps(ref.view(batch, num_dirs, d, seqlen).permute(0, 1, 3, 2), inverse)
    ref_grads = torch.autograd.grad(ref, (xr, wr, br), du)
    ref_grads = (ref_grads[0][..., :d],) + ref_grads[1:]  # z's half has no gradient
    errs = {'out': rel_err(out, ref)}
    errs.update({k: rel_err(a, b) for k, a, b in zip(('x', 'weight', 'bias'), grads, ref_grads)})
    worst = max(errs, key=errs.get)
    ok = errs[worst] < tol and out.dtype == dtype and grads[0].dtype == dtype
    print(f'{"ok  " if ok else "FAIL"} conv shape={shape} permuted={permute} {dtype} worst={worst} '
          f'{errs[worst]:.2e}', flush=True)
    return ok


def check_swiglu(shape, device, dtype=torch.float32, seed=0, tol=1e-5, gate_last=False, row_pad=0):
    """The fused MLP's silu(gate) * value kernels on the halves of x (rows, 2 H), rows optionally padded (a strided
    view): output and the gradient of x (both halves, one tensor) against PyTorch's ops in fp32."""
    from timm_arm.ops.triton.swiglu import swiglu_backward, swiglu_forward
    g = torch.Generator().manual_seed(seed)
    rows, width = shape
    full = torch.randn(rows, 2 * width + row_pad, generator=g).mul(3).to(device, dtype)
    dout = torch.randn(rows, width, generator=g).to(device, dtype)
    x = full[:, :2 * width]
    out, grad = swiglu_forward(x, gate_last), swiglu_backward(x, dout, gate_last)
    xr = x.detach().float().requires_grad_()
    first, second = xr.chunk(2, dim=-1)
    gate, value = (second, first) if gate_last else (first, second)
    ref = torch.nn.functional.silu(gate) * value
    ref_grad, = torch.autograd.grad(ref, xr, dout.float())
    errs = {'out': rel_err(out, ref), 'x': rel_err(grad, ref_grad)}
    worst = max(errs, key=errs.get)
    ok = errs[worst] < tol and out.dtype == dtype and grad.dtype == dtype and out.shape == ref.shape
    print(f'{"ok  " if ok else "FAIL"} swiglu shape={shape} gate_last={gate_last} row_pad={row_pad} {dtype} '
          f'worst={worst} {errs[worst]:.2e}', flush=True)
    return ok


def check_add_layer_norm(shape, device, branch_dtype=torch.float32, has_branch=True, has_bias=True, amp=False,
                         seed=0, tol=1e-5):
    """The fused residual add + LayerNorm kernel (the no-grad path of ``ops.add_layer_norm``) against PyTorch's add
    and layer_norm: the sum and the normed output, the latter in the autocast dtype under autocast."""
    from timm_arm import ops
    g = torch.Generator().manual_seed(seed)
    cols = shape[-1]
    residual = torch.randn(*shape, generator=g).to(device)
    branch = torch.randn(*shape, generator=g).to(device, branch_dtype) if has_branch else None
    weight = (1 + .1 * torch.randn(cols, generator=g)).to(device)
    bias = torch.randn(cols, generator=g).to(device) if has_bias else None
    results = {}
    for backend in ('triton', 'torch'):
        with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=amp):
            results[backend] = ops.add_layer_norm(residual, branch, weight, bias, 1e-5, backend=backend)
    errs = {n: rel_err(a, b) for n, a, b in zip(('total', 'normed'), results['triton'], results['torch'])}
    worst = max(errs, key=errs.get)
    out_dtype = torch.bfloat16 if amp else torch.float32
    total_dtype = residual.dtype if branch is None else torch.promote_types(residual.dtype, branch.dtype)
    ok = errs[worst] < tol and results['triton'][1].dtype == out_dtype and results['triton'][0].dtype == total_dtype
    print(f'{"ok  " if ok else "FAIL"} add_layer_norm shape={shape} branch={branch_dtype if has_branch else None} '
          f'bias={has_bias} autocast={amp} worst={worst} {errs[worst]:.2e}', flush=True)
    return ok


def check_model(device, tol=1e-4):
    """A small ARM classifier (4 directions, class token in the middle) and the 1-direction pretrainer: logits
    and every parameter gradient of the Triton path against the PyTorch path. The Triton path runs twice: on a GPU
    the second run's kernels are launched directly (``launch``'s cached compiled kernels), the first through
    Triton."""
    from timm_arm import ops
    from timm_arm.models.arm_mamba import ArmMamba
    from timm_arm.models.arm_pretrain import ArmPretrainer
    ok = True
    torch.manual_seed(0)
    models = {'classifier': ArmMamba(img_size=24, patch_size=8, embed_dim=16, depth=2, num_classes=5,
                                     d_state=MODEL_D_STATE),
              'pretrainer': ArmPretrainer(img_size=32, patch_size=8, embed_dim=16, depth=2, cluster_size=2,
                                          encoder_args=dict(d_state=MODEL_D_STATE),
                                          decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)}
    for name, model in models.items():
        model = model.to(device)
        with torch.no_grad():  # every direction different
            for n, p in model.named_parameters():
                p.add_(torch.randn_like(p) * .05)
        x = torch.randn(2, 3, 24 if name == 'classifier' else 32, 24 if name == 'classifier' else 32, device=device)
        results = {}
        for run in ('triton', 'triton again', 'torch'):
            ops.set_backend(run.split()[0])
            model.zero_grad()
            out = model(x)
            out.square().mean().backward()
            results[run] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None})
        ops.set_backend(None)
        for run in ('triton', 'triton again'):
            errs = {'out': rel_err(results[run][0], results['torch'][0])}
            errs.update({n: rel_err(g, results['torch'][1][n]) for n, g in results[run][1].items()})
            worst = max(errs, key=errs.get)
            good = errs[worst] < tol and results[run][1].keys() == results['torch'][1].keys()
            print(f'{"ok  " if good else "FAIL"} model {name} {run} vs torch: worst={worst} {errs[worst]:.2e}',
                  flush=True)
            ok &= good
    return ok


def _grads(fn, x, params, amp, seed):
    """Output, input gradient and parameter gradients of fn(x) (bf16 autocast where amp)."""
    for p in params:
        p.grad = None
    xi = x.clone().requires_grad_()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        out = fn(xi)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype))
    return [out.detach(), xi.grad] + [p.grad for p in params]


def _compare(name, ours, ref, names, tol):
    errs = {n: rel_err(a, b) for n, a, b in zip(names, ours, ref)}
    worst = max(errs, key=errs.get)
    same = all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(ours, ref))
    ok = errs[worst] < tol and same
    print(f'{"ok  " if ok else "FAIL"} {name} worst={worst} {errs[worst]:.2e} dtypes/shapes '
          f'{"same" if same else "DIFFER"}', flush=True)
    return ok


def check_fused_mlp(dim, device, gate_last=False, bias=True, amp=False, seed=0, tol=1e-5):
    """The MLP as one autograd node (fc1, silu(gate) * value, fc2; hidden width padded to a multiple of 8 inside)
    against timm's GluMlp forward: output, input and every parameter gradient, and their dtypes."""
    from timm.layers import GluMlp

    from timm_arm import ops
    from timm_arm.models.arm_mamba import AlignedGluMlp
    torch.manual_seed(seed)
    hidden = int(dim * 4 * 2 / 3)
    mlp = AlignedGluMlp(dim, 2 * hidden, act_layer=torch.nn.SiLU, gate_last=gate_last, bias=bias).to(device)
    if bias:
        with torch.no_grad():
            mlp.fc1.bias.normal_()
            mlp.fc2.bias.normal_()
    x = torch.randn(2, 9, dim, device=device)
    params = list(mlp.parameters())
    ops.set_backend('triton')
    ours = _grads(mlp, x, params, amp, seed + 1)
    ops.set_backend(None)
    ref = _grads(lambda t: GluMlp.forward(mlp, t), x, params, amp, seed + 1)
    names = ['out', 'x'] + [n for n, _ in mlp.named_parameters()]
    return _compare(f'fused mlp dim={dim} hidden={hidden} gate_last={gate_last} bias={bias} amp={amp}', ours, ref,
                    names, tol)


def check_fused_mixer(num_dirs, device, amp=False, seed=0, tol=1e-5):
    """The whole mixer as one autograd node (in-projection, core, out-projection) against the projections called as
    modules around the Triton core (``mixer_core``): output, input and every parameter gradient, their dtypes."""
    from timm_arm import ops
    from timm_arm.models.arm_mamba import MultiDirectionMamba, scan_orders
    torch.manual_seed(seed)
    m = MultiDirectionMamba(16, num_directions=num_dirs, d_state=MODEL_D_STATE).to(device)
    with torch.no_grad():  # every direction different
        for p in m.parameters():
            p.add_(torch.randn_like(p) * .05)
    has_cls = num_dirs > 1
    order = scan_orders((4, 5), num_dirs, 10 if has_cls else None, torch.device(device))
    x = torch.randn(2, 20 + has_cls, 16, device=device)
    params = list(m.parameters())
    ops.set_backend('triton')
    ours = _grads(lambda t: m(t, order), x, params, amp, seed + 1)
    ref = _grads(lambda t: m.out_proj(ops.mixer_core(m.in_proj(t), order, m.weights())), x, params, amp, seed + 1)
    ops.set_backend(None)
    names = ['out', 'x'] + [n for n, _ in m.named_parameters()]
    return _compare(f'fused mixer directions={num_dirs} amp={amp}', ours, ref, names, tol)


TOKEN_CASES = [
    # (batch, directions, L, d, N), permuted
    ((1, 1, 1, 3, 4), False),
    ((2, 4, 17, 5, 4), True),
    ((1, 2, 50, 8, 16), True),
    ((2, 1, 33, 4, 5), False),  # N not a power of two
]
CONV_CASES = [
    # (batch, directions, L, d, width), permuted
    ((1, 1, 1, 3, 4), False),
    ((2, 4, 17, 5, 4), True),
    ((1, 2, 70, 70, 3), True),  # two blocks of steps
    ((1, 4, 140, 200, 4), True),  # several blocks of steps and of channels
    ((2, 1, 33, 4, 2), False),
]


def check_layouts_and_dtypes(device):
    """B, C as strided views of one projection (as ARM passes them), bf16 activations, and the no-grad path."""
    batch, groups, d, seqlen, d_state = 2, 2, 4, 19, 4
    t = make_inputs(batch, groups, d, seqlen, d_state, device, seed=3)
    x_dbl = torch.randn(batch, groups, 3 + 2 * d_state, seqlen, device=device)
    t['B'], t['C'] = x_dbl[:, :, 3:3 + d_state], x_dbl[:, :, 3 + d_state:]
    t['u'] = torch.randn(batch, seqlen, groups * d, device=device).transpose(1, 2)  # stride(-1) != 1
    ref = selective_scan_sequential(**t, delta_softplus=True)
    with torch.no_grad():
        err = rel_err(selective_scan_triton(**t, delta_softplus=True), ref)
    half = {k: (v.to(torch.bfloat16) if k in ('u', 'delta', 'B', 'C', 'z') else v) for k, v in t.items()}
    out16 = selective_scan_triton(**half, delta_softplus=True)
    ref16 = selective_scan_sequential(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    err16 = rel_err(out16, ref16)
    ok = err < 1e-5 and err16 < 1e-2 and out16.dtype == torch.bfloat16
    print(f'{"ok  " if ok else "FAIL"} strided views + no grad {err:.2e}, bf16 {err16:.2e}', flush=True)
    return ok


# Triton's CPU interpreter converts fp32 to bf16 by truncation (round toward zero) where the GPU rounds to nearest:
# every bf16 store carries up to twice the rounding error there
BF16_TOL = 2e-2 if INTERPRETED else 1e-2




def _id(value):
    return 'x'.join(map(str, value)) if isinstance(value, tuple) else str(value)


def _with_configs(cases, name):
    """Every case with every tile configuration, but the longest (the interpreter's slowest) with the default tile
    only: the other tiles meet every length class (1 step, partial chunks, several segments) in the shorter cases."""
    longest = max(case[0][3 if name == 'channel-first' else 2] for case in cases)
    out = []
    for case in cases:
        length = case[0][3 if name == 'channel-first' else 2]
        for config in CONFIGS if length < longest or not INTERPRETED else ['default']:
            tag = ('+'.join(sorted(case[1])) or 'plain') if name == 'channel-first' else (
                'perm' if case[1] else 'order')
            out.append(pytest.param(*case, config, id=f'{_id(case[0])}-{tag}-{config}'))
    return out


@pytest.mark.parametrize('shape, options, config', _with_configs(CASES, 'channel-first'))
def test_scan_channel_first(shape, options, config):
    assert check(shape, options, DEVICE, CONFIGS[config])


@pytest.mark.parametrize('shape, permute, config', _with_configs(TOKEN_CASES, 'tokens'))
def test_scan_tokens(shape, permute, config):
    assert check_tokens(shape, permute, DEVICE, config=CONFIGS[config])


def test_scan_tokens_bf16():
    assert check_tokens((2, 4, 19, 6, 8), True, DEVICE, dtype=torch.bfloat16, tol=BF16_TOL)


@pytest.mark.parametrize('shape', SCATTER_CASES, ids=_id)
def test_scan_lane_reduce_scatter(shape):
    """The default backward tile: dB / dC channel sums as a lane reduce-scatter."""
    batch, num_dirs, seqlen, d, d_state = shape
    assert _lane_tile(scan_config(d, seqlen, d_state), pow2(d_state)), 'not on the reduce-scatter path'
    assert check_tokens(shape, True, DEVICE, seed=3)


def test_scan_states_in_backward_kernel():
    assert check_tokens(SCATTER_CASES[0], True, DEVICE, config=IN_KERNEL_STATES, seed=5)


def test_scan_lane_reduce_scatter_bf16():
    assert check_tokens(SCATTER_CASES[0], True, DEVICE, dtype=torch.bfloat16, seed=4, tol=BF16_TOL)


def test_scan_deterministic_partials():
    """Under deterministic algorithms: per-program partials summed by PyTorch instead of atomic adds."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert check_tokens(SCATTER_CASES[1], True, DEVICE, seed=6)
    finally:
        torch.use_deterministic_algorithms(False)


def test_scan_strided_views_no_grad_and_bf16():
    assert check_layouts_and_dtypes(DEVICE)


@pytest.mark.parametrize('shape, permute', CONV_CASES,
                         ids=[f'{_id(s)}-{"perm" if p else "order"}' for s, p in CONV_CASES])
def test_conv(shape, permute):
    assert check_conv(shape, permute, DEVICE)


def test_conv_bf16():
    assert check_conv((2, 4, 19, 6, 4), True, DEVICE, dtype=torch.bfloat16, tol=BF16_TOL)


@pytest.mark.parametrize('shape, gate_last, row_pad, dtype', [
    ((21, 53), False, 0, torch.float32), ((2, 4100), True, 0, torch.float32), ((1, 1), False, 0, torch.float32),
    ((9, 300), False, 6, torch.float32), ((5, 3000), True, 0, torch.bfloat16)], ids=_id)
def test_swiglu(shape, gate_last, row_pad, dtype):
    tol = BF16_TOL if dtype == torch.bfloat16 else 1e-5
    assert check_swiglu(shape, DEVICE, dtype=dtype, seed=shape[1] % 7, tol=tol, gate_last=gate_last, row_pad=row_pad)


@pytest.mark.parametrize('shape, branch_dtype, has_branch, has_bias, amp', [
    ((2, 9, 24), torch.float32, True, True, False), ((3, 5, 40), torch.bfloat16, True, False, False),
    ((7, 33), torch.float32, False, True, False), ((4, 768), torch.bfloat16, True, True, True)], ids=_id)
def test_add_layer_norm(shape, branch_dtype, has_branch, has_bias, amp):
    assert check_add_layer_norm(shape, DEVICE, branch_dtype=branch_dtype, has_branch=has_branch, has_bias=has_bias,
                                amp=amp, seed=shape[-1] % 5, tol=BF16_TOL if amp else 1e-5)


@pytest.mark.parametrize('dim, gate_last, bias', [(20, False, True), (36, True, True), (24, False, False)], ids=_id)
def test_fused_mlp(dim, gate_last, bias):
    """hidden 53 (padded to 56), 96, 64"""
    assert check_fused_mlp(dim, DEVICE, gate_last, bias, seed=dim % 3)


@pytest.mark.parametrize('num_dirs', [4, 1])
def test_fused_mixer(num_dirs):
    assert check_fused_mixer(num_dirs, DEVICE, seed=num_dirs % 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='bf16 GEMMs under autocast: on the GPU')
def test_fused_mlp_and_mixer_bf16_autocast():
    assert check_fused_mlp(1024, DEVICE, amp=True, seed=3, tol=BF16_TOL)  # ARM-L's 2730, padded to 2736
    assert check_fused_mixer(4, DEVICE, amp=True, seed=2, tol=1e-3)


def test_models_triton_vs_torch():
    """A classifier and a pretrainer: logits / loss and every parameter gradient; on a GPU the second Triton run
    launches the cached compiled kernels directly."""
    assert check_model(DEVICE)


SM90_CHECK = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from timm_arm.ops.triton import scan_backward as sb
from timm_arm.ops.triton.scan import scan_config
fn = sb._scan_bwd_kernel
cfg = scan_config(768, 197, 16)
assert sb._lane_tile(cfg, 16), 'ARM-B shape no longer uses the lane tile'
flags = dict(NP=16, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, HAS_ORDER=True, BLOCK_D=cfg.block_d_bwd, T=cfg.T_bwd,
             M=cfg.chunks_per_segment, LANE_TILE=True, HAS_STATES=True, ATOMIC=True)
signature = {n: 'constexpr' if n in flags else ('*i32' if n == 'order_ptr' else '*fp32') if n.endswith('_ptr')
             else 'i32' for n in fn.arg_names}
source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in flags.items()})
kernel = triton.compile(source, target=GPUTarget('cuda', 90, 32),
                        options=dict(num_warps=cfg.warps_bwd, maxnreg=cfg.max_registers_bwd))
print(kernel.asm['ttgir'])
"""


def test_lane_tile_layout_puts_channels_on_lane_bits():
    """The reduce-scatter's warp shuffles exchange registers between lanes c and c ^ 2^i, which is channel c ^ 2^i
    only if Triton lays the shuffled tensors out with the 16 channels on lane bits 0-3 (fastest dimension, one
    element per thread, one warp). Compiled for sm_90 (no GPU needed, outside the interpreter) and read from TTGIR."""
    pytest.importorskip('triton.backends.nvidia')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get('PYTHONPATH')]))
    proc = subprocess.run([sys.executable, '-c', SM90_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and ('GPUTarget' in proc.stderr or 'ptxas' in proc.stderr):
        pytest.skip(f'cannot compile for sm_90 here: {proc.stderr.strip().splitlines()[-1]}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    ttgir = proc.stdout
    layouts = dict(re.findall(r'^(#\w+) = #ttg\.blocked<\{(.*?)\}>', ttgir, re.M))
    shuffles = re.findall(
        r'elementwise_inline_asm "shfl\.sync\.bfly\.b32 \$0, \$1, (\d+),.*?-> tensor<([0-9x]+)xf32, (#\w+)>', ttgir)
    assert sorted(int(m) for m, _, _ in shuffles) == [1, 1, 2, 2, 4, 4, 8, 8]  # dB and dC, 4 levels each
    for _, shape, layout in shuffles:
        assert layout in layouts, f'shuffle operand in a non-blocked layout {layout}'
        fields = {k: [int(v) for v in vs.split(',')]
                  for k, vs in re.findall(r'(\w+) = \[([0-9, ]+)\]', layouts[layout])}
        rank = len(shape.split('x'))
        assert shape.split('x')[-1] == '16'
        assert fields['threadsPerWarp'][-1] == 16 and fields['order'][0] == rank - 1, layouts[layout]
        assert set(fields['sizePerThread']) == {1} and set(fields['warpsPerCTA']) == {1}, layouts[layout]


def test_triton_conv_rejects_widths_above_four():
    """The Triton conv keeps up to 4 taps in registers (causal-conv1d's limit too): wider is a clear error,
    raised before any kernel launch."""
    from timm_arm.ops import MixerWeights
    from timm_arm.ops.triton import mixer_core
    K, d, N, R = 2, 8, 4, 2
    for width in (5, 6):
        weights = MixerWeights(torch.randn(K, d, width), torch.randn(K, d), torch.randn(K, R + 2 * N, d),
                               torch.randn(K, d, R), torch.randn(K, d), -torch.rand(K, d, N), torch.randn(K, d))
        with pytest.raises(ValueError, match=f'widths 1 to 4.*got {width}'):
            mixer_core(torch.randn(1, 6, 2 * d), weights)


def test_fused_mixer_and_mlp_reject_mismatched_shapes():
    """The one-node mixer and MLP check their weights against the input before any GEMM or launch."""
    from timm_arm.ops import MixerWeights
    from timm_arm.ops.triton import mixer, swiglu_mlp
    K, d, N, R, dim = 2, 8, 4, 2, 6
    core = (torch.randn(K, d, 4), torch.randn(K, d), torch.randn(K, R + 2 * N, d), torch.randn(K, d, R),
            torch.randn(K, d), -torch.rand(K, d, N), torch.randn(K, d))
    x = torch.randn(1, 5, dim)
    with pytest.raises(ValueError, match=r'in_proj_weight \(16, 7\)'):
        mixer(x, MixerWeights(*core, torch.randn(2 * d, dim + 1), torch.randn(dim, d)))
    with pytest.raises(ValueError, match=r'in-projection width 14'):
        mixer(x, MixerWeights(*core, torch.randn(2 * d - 2, dim), torch.randn(dim, d)))
    with pytest.raises(ValueError, match=r'out_proj_weight \(6, 9\)'):
        mixer(x, MixerWeights(*core, torch.randn(2 * d, dim), torch.randn(dim, d + 1)))
    with pytest.raises(ValueError, match=r'need in_proj_weight and out_proj_weight'):
        mixer(x, MixerWeights(*core))
    order = torch.arange(5).expand(K, 5)
    with pytest.raises(ValueError, match=r'order and inverse go together'):
        mixer(x, MixerWeights(*core, torch.randn(2 * d, dim), torch.randn(dim, d)), order)
    with pytest.raises(ValueError, match=r'fc1 weight \(10, 6\)'):
        swiglu_mlp(x, torch.randn(10, dim), None, torch.randn(dim, 4), None)
    with pytest.raises(ValueError, match=r'fc1 weight \(8, 6\)'):
        swiglu_mlp(x, torch.randn(8, dim), torch.randn(7), torch.randn(dim, 4), None)


def test_direct_launch_switch_and_declared_triton_versions(monkeypatch):
    """The launcher calls compiled kernels directly only where Triton's CUDA launcher has the calling convention it
    was written for, never when TIMM_ARM_TRITON_LAUNCH=triton asks for Triton's public path; and every Triton
    version pyproject.toml declares for the direct path has that launcher (checked against the installed one)."""
    pytest.importorskip('triton.backends.nvidia.driver')
    tomllib = pytest.importorskip('tomllib')
    import triton

    from timm_arm.ops.triton import launch
    monkeypatch.setattr(launch, 'ON_CUDA_COMPILER', True)
    monkeypatch.setenv('TIMM_ARM_TRITON_LAUNCH', 'triton')
    assert not launch._direct_launch_supported()
    monkeypatch.delenv('TIMM_ARM_TRITON_LAUNCH')
    with open(os.path.join(os.path.dirname(HERE), 'pyproject.toml'), 'rb') as f:
        declared = tomllib.load(f)['tool']['timm_arm']['triton-direct-launch']
    installed = '.'.join(triton.__version__.split('.')[:2])
    if installed not in declared:
        pytest.skip(f'triton {triton.__version__} is not declared for the direct launch path ({declared})')
    assert launch._direct_launch_supported(), f'triton {installed} is declared but its launcher differs'
    monkeypatch.setattr(launch, 'ON_CUDA_COMPILER', False)  # the interpreter, ROCm
    assert not launch._direct_launch_supported()
