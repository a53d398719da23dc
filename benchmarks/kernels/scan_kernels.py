""" The scan and conv kernels alone at ARM's shapes: our Triton kernels (token-major, scan orders inside the
kernel, as the model calls them) vs mamba-ssm / causal-conv1d (channel-first, orders not counted), one run.

    python benchmarks/kernels/scan_kernels.py [--json OUT.json] [--sweep] [--shapes 0,1]

Times the forward (no grad) and forward+backward (autograd.grad of every input), median of CUDA-event timings,
bf16 activations, fp32 A / D / delta_bias, softplus, D as in ARM. --sweep also times the Triton scan's forward
and backward over tile configurations at each shape and prints the best (with registers and spills).
Correctness is checked by tests/test_triton_kernels.py and benchmarks/gpu_check.py.
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from _common import cuda_median_ms  # noqa: E402

from timm_arm import ops
from timm_arm.models.arm_mamba import scan_orders
from timm_arm.ops.triton import conv as triton_conv
from timm_arm.ops.triton import scan as triton_scan
from timm_arm.ops.triton import scan_backward as triton_scan_backward
from timm_arm.ops.triton import selective_scan_tokens

_compiled = {}  # the latest compiled scan kernels (registers, spills), recorded around the kernels' launcher


def _record(module, name):
    launch = module.launch

    def recording_launch(kernel, *args, **kwargs):
        _compiled[name] = launch(kernel, *args, **kwargs)
        return _compiled[name]
    module.launch = recording_launch

# (batch, directions, L, d, N, patch grid)
SHAPES = [
    (128, 4, 197, 768, 16, (14, 14)),  # ARM-B, 224 px, training batch
    (64, 4, 197, 1024, 16, (14, 14)),  # ARM-L
    (64, 4, 197, 1536, 16, (14, 14)),  # ARM-H
    (32, 4, 577, 768, 16, (24, 24)),  # ARM-B, 384 px
]


def token_inputs(batch, K, seqlen, d, N, grid, dtype=torch.bfloat16):
    g = torch.Generator(device='cuda').manual_seed(0)
    mk = lambda *s, scale=1.: torch.randn(*s, device='cuda', generator=g) * scale
    x_dbl = mk(batch, K, seqlen, 48 + 2 * N).to(dtype)
    t = dict(u=mk(batch, K, seqlen, d).to(dtype), delta=mk(batch, K, seqlen, d, scale=.5).to(dtype),
             A=-(torch.rand(K, d, N, device='cuda', generator=g) * 4 + .1), B=x_dbl[..., 48:48 + N],
             C=x_dbl[..., 48 + N:], D=mk(K, d), delta_bias=mk(K, d, scale=.5) - 4.)
    order = scan_orders(grid, K, seqlen // 2 if seqlen % 2 else None, torch.device('cuda'))
    return {k: v.requires_grad_() for k, v in t.items()}, order


def channel_first(t):
    """The same inputs in mamba-ssm's layout (copies, made outside the timed region)."""
    batch, K, seqlen, d = t['u'].shape
    cf = lambda x: x.detach().permute(0, 1, 3, 2).reshape(batch, -1, seqlen).contiguous().requires_grad_()
    return dict(u=cf(t['u']), delta=cf(t['delta']), A=t['A'].detach().reshape(K * d, -1).requires_grad_(),
                B=t['B'].detach().transpose(2, 3).contiguous().requires_grad_(),
                C=t['C'].detach().transpose(2, 3).contiguous().requires_grad_(),
                D=t['D'].detach().reshape(-1).requires_grad_(),
                delta_bias=t['delta_bias'].detach().reshape(-1).requires_grad_())


def fwd_and_fwd_bwd(fn, inputs, iters):
    out = fn()
    grad = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            fn()
    return (cuda_median_ms(fwd, iters),
            cuda_median_ms(lambda: torch.autograd.grad(fn(), inputs, grad), iters))


def time_shape(shape, iters, has_cuda):
    batch, K, seqlen, d, N, grid = shape
    t, order = token_inputs(*shape)
    row = dict(shape=dict(batch=batch, directions=K, L=seqlen, d=d, N=N))
    fn = lambda: selective_scan_tokens(**t, delta_softplus=True, order=order[0])
    row['triton_scan'] = fwd_and_fwd_bwd(fn, list(t.values()), iters)
    x = torch.randn(batch, seqlen, 2 * d, device='cuda', dtype=torch.bfloat16)
    w, b = torch.randn(K, d, 4, device='cuda'), torch.randn(K, d, device='cuda')
    orders = tuple(o.to(torch.int32) for o in order)
    du = torch.randn(batch, K, seqlen, d, device='cuda', dtype=torch.bfloat16)
    row['triton_conv'] = (cuda_median_ms(lambda: triton_conv.conv_forward(x[..., :d], w, b, orders[0]), iters),
                          cuda_median_ms(lambda: (triton_conv.conv_forward(x[..., :d], w, b, orders[0]),
                                                  triton_conv.conv_backward(du, x[..., :d], w, b, *orders)), iters))
    w, b = w.requires_grad_(), b.requires_grad_()
    if has_cuda:
        c = channel_first(t)
        fn = lambda: ops.selective_scan(**c, delta_softplus=True, backend='cuda')
        row['cuda_scan'] = fwd_and_fwd_bwd(fn, list(c.values()), iters)
        xc = torch.randn(batch, K * d, seqlen, device='cuda', dtype=torch.bfloat16, requires_grad=True)
        fn = lambda: ops.causal_conv1d_silu(xc, w.view(K * d, 4), b.view(-1), backend='cuda')
        row['cuda_conv'] = fwd_and_fwd_bwd(fn, [xc, w, b], iters)
    return row


def sweep(shape, iters):
    """The Triton scan's forward and backward alone over tile configurations."""
    t, order = token_inputs(*shape)
    t = {k: v.detach() for k, v in t.items()}
    args = (t['u'], t['delta'], t['A'].contiguous(), t['B'], t['C'], t['D'], t['delta_bias'], True,
            order[0].to(torch.int32))
    dy = torch.randn_like(t['u'])
    fwd_rows, bwd_rows = [], []
    grids = ((fwd_rows, 'scan_fwd', itertools.product((4,), (32, 64), (1,))),
             (bwd_rows, 'scan_bwd', [(2, 16, 1, m, r) for m in (2, 4, 6, 8) for r in (None, 144, 160, 176)]))
    for rows, name, grid in grids:
        for T, bd, warps, *extra in grid:
            if bd < 8 * warps:
                continue
            cfg = triton_scan.ScanConfig(T, bd, warps, T, bd, warps, *extra)
            call = (lambda: triton_scan.scan_forward(*args, cfg)) if name == 'scan_fwd' else (
                lambda: triton_scan_backward.scan_backward(dy, *args, cfg))
            try:
                ms = cuda_median_ms(call, iters)
                k = _compiled[name]
                rows.append((ms, T, bd, warps, k.n_regs, k.n_spills, cfg.chunks_per_segment, cfg.max_registers_bwd))
            except Exception as e:  # out of resources etc.
                print(f'  sweep {name} T={T} bd={bd} warps={warps}: {type(e).__name__}: {str(e)[:100]}')
    fwd_rows.sort()
    bwd_rows.sort()
    for name, rows in (('forward', fwd_rows), ('backward', bwd_rows)):
        print(f'sweep {shape[:5]} {name}, best first (ms, T, BLOCK_D, warps, registers, spills, chunks/segment, '
              f'register cap):')
        print('  ' + ', '.join(f'{ms:.3f} T{T} bd{bd} w{w} r{r} s{sp} M{m} cap{c}'
                               for ms, T, bd, w, r, sp, m, c in rows[:10]))
    return dict(shape=shape[:5], forward=fwd_rows, backward=bwd_rows)


def sweep_conv(shape, iters):
    """The Triton conv's forward and backward over the forward's tile sizes (module-level constants of
    ``timm_arm.ops.triton.conv``: steps per program, channels, warps)."""
    batch, K, seqlen, d, N, grid = shape
    _, order = token_inputs(*shape)
    x = torch.randn(batch, seqlen, 2 * d, device='cuda', dtype=torch.bfloat16)
    w = torch.randn(K, d, 4, device='cuda')
    b = torch.randn(K, d, device='cuda')
    order = tuple(o.to(torch.int32) for o in order)
    du = torch.randn(batch, K, seqlen, d, device='cuda', dtype=torch.bfloat16)
    saved, rows = (triton_conv.CONV_STEPS, triton_conv.CONV_BLOCK_D, triton_conv.CONV_WARPS), []
    try:
        for cfg in ((64, 128, 1), (32, 64, 4), (16, 64, 2), (16, 128, 4), (64, 64, 4), (32, 128, 4), (8, 128, 2)):
            triton_conv.CONV_STEPS, triton_conv.CONV_BLOCK_D, triton_conv.CONV_WARPS = cfg
            fwd = cuda_median_ms(lambda: triton_conv.conv_forward(x[..., :d], w, b, order[0]), iters)
            bwd = cuda_median_ms(lambda: triton_conv.conv_backward(du, x[..., :d], w, b, *order), iters)
            rows.append((fwd + bwd, fwd, bwd, cfg))
    finally:
        triton_conv.CONV_STEPS, triton_conv.CONV_BLOCK_D, triton_conv.CONV_WARPS = saved
    rows.sort()
    print(f'sweep conv {shape[:4]}, best first (fwd + bwd, fwd, bwd ms, (STEPS, BLOCK_D, warps)):')
    print('  ' + ', '.join(f'{t:.3f} {f:.3f} {bw:.3f} {c}' for t, f, bw, c in rows))
    return dict(shape=shape[:5], conv=rows)


def main():
    _record(triton_scan, 'scan_fwd')
    _record(triton_scan_backward, 'scan_bwd')
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--json', default=None)
    parser.add_argument('--sweep', action='store_true', help='also sweep the Triton scan tile configurations')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--shapes', default=None, help='indices into SHAPES, e.g. 0,3')
    args = parser.parse_args()
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(',')]
    has_cuda = ops.has_cuda_kernels()
    device = torch.cuda.get_device_name()
    print(f'device: {device}, torch {torch.__version__}')
    rows, sweeps = [], []
    for shape in shapes:
        if args.sweep:
            sweeps.append(sweep(shape, max(5, args.iters // 4)))
            sweeps.append(sweep_conv(shape, max(5, args.iters // 4)))
        rows.append(time_shape(shape, args.iters, has_cuda))
        torch.cuda.empty_cache()
    print('| shape (b, K, L, d, N) | triton scan fwd / fwd+bwd | mamba-ssm scan fwd / fwd+bwd | '
          'triton conv fwd / fwd+bwd | causal-conv1d fwd / fwd+bwd |')
    print('| --- | --- | --- | --- | --- |')
    for row in rows:
        s = row['shape']
        cell = lambda k: f'{row[k][0]:.3f} / {row[k][1]:.3f} ms' if k in row else '-'
        print(f"| {s['batch']}, {s['directions']}, {s['L']}, {s['d']}, {s['N']} | {cell('triton_scan')} | "
              f"{cell('cuda_scan')} | {cell('triton_conv')} | {cell('cuda_conv')} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=device, torch=torch.__version__, rows=rows, sweeps=sweeps), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
