""" Selective-scan kernels at ARM's shapes: Triton vs mamba-ssm's CUDA kernel vs plain PyTorch, in one run.

    python benchmarks/scan_kernels.py [--json OUT.json] [--no-torch] [--sweep]

For each shape (bf16 u/delta/z/B/C, fp32 A/D/delta_bias, softplus, D and z as in ARM) it times the forward
(no grad) and forward+backward (torch.autograd.grad of all eight inputs), median of CUDA-event timings, and
checks the Triton outputs and gradients against mamba-ssm in bf16 (tolerance 1e-2 of the largest magnitude)
and against the PyTorch scan in fp32 at a smaller batch (tolerance 1e-4). --sweep also times the Triton
forward and backward over tile configurations for each shape and prints the best. Exits non-zero when a
check fails. Needs a CUDA GPU; the 'cuda' column needs mamba-ssm installed.
"""
import argparse
import itertools
import json
import sys

import torch

from _timing import cuda_median_ms
from timm_arm import ops
from timm_arm.ops.triton_scan import ScanConfig, scan_config, selective_scan_triton

# (batch, groups = scan directions, channels, L, N)
SHAPES = [
    (128, 4, 3072, 197, 16),  # ARM-B, 224 px
    (64, 4, 4096, 197, 16),  # ARM-L
    (64, 4, 6144, 197, 16),  # ARM-H
    (32, 4, 3072, 577, 16),  # ARM-B, 384 px
]
NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def make_inputs(batch, groups, channels, seqlen, d_state, dtype, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    mk = lambda *s, scale=1.: torch.randn(*s, device='cuda', generator=g) * scale
    t = dict(u=mk(batch, channels, seqlen).to(dtype), delta=mk(batch, channels, seqlen, scale=.5).to(dtype),
             A=-(torch.rand(channels, d_state, device='cuda', generator=g) * 4 + .1),
             B=mk(batch, groups, d_state, seqlen).to(dtype), C=mk(batch, groups, d_state, seqlen).to(dtype),
             D=mk(channels), z=mk(batch, channels, seqlen).to(dtype), delta_bias=mk(channels, scale=.5) - 4.)
    return {k: v.requires_grad_() for k, v in t.items()}


def scan_fn(backend, config=None):
    if backend == 'triton':
        return lambda **t: selective_scan_triton(**t, delta_softplus=True, config=config)
    return lambda **t: ops.selective_scan(**t, delta_softplus=True, backend=backend)


def run_grads(fn, t, grad):
    out = fn(**t)
    return out, torch.autograd.grad(out, list(t.values()), grad)


def time_backend(fn, t, grad, iters):
    def fwd():
        with torch.no_grad():
            fn(**t)
    return cuda_median_ms(fwd, iters), cuda_median_ms(lambda: run_grads(fn, t, grad), iters)


def memory_floor_ms(batch, groups, channels, seqlen, d_state, itemsize=2):
    # forward: read u, delta, z, B, C, write out; bytes / ~4.8 TB/s (H200) -- an order-of-magnitude reference
    nbytes = (4 * batch * channels * seqlen + 2 * batch * groups * d_state * seqlen) * itemsize
    return nbytes / 4.8e12 * 1e3


def sweep(shape, iters):
    """Time the Triton forward and backward alone over tile configurations."""
    from timm_arm.ops import triton_scan as ts
    batch, groups, channels, seqlen, d_state = shape
    t = {k: v.detach() for k, v in make_inputs(*shape, torch.bfloat16).items()}
    dout = torch.randn_like(t['u'])
    fwd_rows, bwd_rows = [], []
    for T, bd, warps in itertools.product((2, 4, 8, 16), (8, 16, 32, 64, 128, 256), (1, 2, 4, 8)):
        per_thread = T * 16 * bd // (32 * warps)  # fp32 elements of one (T, N, BLOCK_D) tile per thread
        if not 8 <= per_thread <= 64 or bd > channels // groups or bd < 16 * warps:
            continue
        cfg = ScanConfig(T, bd, warps, T, bd, warps)
        try:
            ms = cuda_median_ms(lambda: ts._forward(t['u'], t['delta'], t['A'], t['B'], t['C'], t['D'], t['z'],
                                           t['delta_bias'], True, cfg, True), iters)
            k = ts._last_kernels['fwd']
            fwd_rows.append((ms, T, bd, warps, k.n_regs, k.n_spills))
            _, states = ts._forward(t['u'], t['delta'], t['A'], t['B'], t['C'], t['D'], t['z'], t['delta_bias'],
                                    True, cfg, True)
            ms = cuda_median_ms(lambda: ts._backward(dout, t['u'], t['delta'], t['A'], t['B'], t['C'], t['D'], t['z'],
                                            t['delta_bias'], True, states, cfg), iters)
            k = ts._last_kernels['bwd']
            bwd_rows.append((ms, T, bd, warps, k.n_regs, k.n_spills))
        except Exception as e:  # out of resources etc.
            print(f'  sweep T={T} bd={bd} warps={warps}: {type(e).__name__}: {str(e)[:100]}')
    fwd_rows.sort()
    bwd_rows.sort()
    for name, rows in (('forward (saving states)', fwd_rows), ('backward', bwd_rows)):
        print(f'sweep {shape} {name}, best first (ms, T, BLOCK_D, warps, registers, spills):')
        print('  ' + ', '.join(f'{ms:.3f} T{T} bd{bd} w{w} r{r} s{sp}' for ms, T, bd, w, r, sp in rows[:10]))
    return dict(shape=shape, forward=fwd_rows, backward=bwd_rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--json', default=None)
    parser.add_argument('--no-torch', action='store_true', help='skip timing the (slow, memory-hungry) PyTorch scan')
    parser.add_argument('--no-cuda', action='store_true', help='skip mamba-ssm')
    parser.add_argument('--sweep', action='store_true', help='also sweep Triton tile configurations')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--shapes', default=None, help='indices into SHAPES, e.g. 0,3')
    args = parser.parse_args()
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(',')]
    backends = ['triton'] + ([] if args.no_cuda else ['cuda']) + ([] if args.no_torch else ['torch'])
    print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}')

    rows, sweeps, ok = [], [], True
    for shape in shapes:
        batch, groups, channels, seqlen, d_state = shape
        row = dict(shape=dict(batch=batch, groups=groups, channels=channels, L=seqlen, N=d_state),
                   config=scan_config(channels // groups, seqlen, d_state)._asdict(),
                   fwd_floor_ms=memory_floor_ms(*shape))
        t = make_inputs(*shape, torch.bfloat16)
        grad = torch.randn_like(t['u'])
        results = {}
        for backend in backends:
            torch.cuda.reset_peak_memory_stats()
            fwd, fwd_bwd = time_backend(scan_fn(backend), t, grad, args.iters)
            row[backend] = dict(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
            if backend != 'torch':
                results[backend] = run_grads(scan_fn(backend), t, grad)
        if 'cuda' in results:  # bf16: triton vs mamba-ssm
            out_t, g_t = results['triton']
            out_c, g_c = results['cuda']
            errs = {'out': rel_err(out_t, out_c), **{k: rel_err(a, b) for k, a, b in zip(NAMES, g_t, g_c)}}
            row['bf16_vs_cuda'] = errs
            ok &= max(errs.values()) < 1e-2
        del results, t, grad
        # fp32: triton vs the PyTorch scan, at a batch small enough for the PyTorch path
        small = (min(batch, 4),) + shape[1:]
        t = make_inputs(*small, torch.float32, seed=1)
        grad = torch.randn_like(t['u'])
        out_t, g_t = run_grads(scan_fn('triton'), t, grad)
        out_r, g_r = run_grads(scan_fn('torch'), t, grad)
        errs = {'out': rel_err(out_t, out_r), **{k: rel_err(a, b) for k, a, b in zip(NAMES, g_t, g_r)}}
        row['fp32_vs_torch'] = errs
        ok &= max(errs.values()) < 1e-4
        del t, grad, out_t, g_t, out_r, g_r
        rows.append(row)
        if args.sweep:
            sweeps.append(sweep(shape, args.iters))
        torch.cuda.empty_cache()

    print()
    head = ('| shape (b, G, Dc, L, N) | fwd floor | '
            + ' | '.join(f'{b} fwd | {b} fwd+bwd | {b} GiB' for b in backends)
            + ' | triton speedup fwd / fwd+bwd vs cuda | max err bf16 vs cuda | max err fp32 vs torch |')
    print(head)
    print('|' + ' --- |' * (head.count('|') - 1))
    for row in rows:
        s = row['shape']
        cells = [f"{s['batch']}, {s['groups']}, {s['channels']}, {s['L']}, {s['N']}", f"{row['fwd_floor_ms']:.3f} ms"]
        for b in backends:
            cells += [f"{row[b]['fwd_ms']:.3f} ms", f"{row[b]['fwd_bwd_ms']:.3f} ms", f"{row[b]['peak_gib']:.1f}"]
        if 'cuda' in row:
            cells.append(f"{row['cuda']['fwd_ms'] / row['triton']['fwd_ms']:.1f}x / "
                         f"{row['cuda']['fwd_bwd_ms'] / row['triton']['fwd_bwd_ms']:.1f}x")
        else:
            cells.append('-')
        bf = row.get('bf16_vs_cuda')
        cells.append(f"{max(bf.values()):.1e} ({max(bf, key=bf.get)})" if bf else '-')
        fp = row['fp32_vs_torch']
        cells.append(f"{max(fp.values()):.1e} ({max(fp, key=fp.get)})")
        print('| ' + ' | '.join(cells) + ' |')
    print('\nALL CHECKS OK' if ok else '\nCHECK FAILURES')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, sweeps=sweeps), f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
