""" The Triton scan (or, with --conv, causal conv) backward of this tree against the one of another git revision,
same run, same inputs.

    python benchmarks/kernels/scan_bwd_ab.py --against e4371a5 [--conv] [--json OUT.json] [--shapes 0,1] [--sweep]

For each shape (benchmarks/kernels/scan_kernels.SHAPES) it loads ``timm_arm/ops/triton_scan.py`` as it was at the other
revision (``git show``, into a temporary module), checks that both give the same gradients (relative to the
largest reference value: bf16 outputs differ by rounding only), and times both backwards (and forwards) twice,
alternating, median of CUDA-event timings. --sweep also times this tree's backward over segment lengths and
register caps (the conv's: over its steps per program, channels and warps). Needs a GPU, and the git history of
this checkout unless --against names a saved copy of the module.
"""
import argparse
import importlib.util
import inspect
import itertools
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from _common import cuda_median_ms  # noqa: E402
from scan_kernels import SHAPES, token_inputs

from timm_arm.models.arm_mamba import scan_orders
from timm_arm.ops import triton_scan as ts

GRADS = ('du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'dbias')


def resolve(revision: str) -> str:
    """The full hash a revision names in this checkout (a copied tree's HEAD may not be the commit you expect), or,
    for a saved copy of the module (a .py file), its git blob hash."""
    if revision.endswith('.py'):
        if not os.path.isfile(revision):
            raise SystemExit(f'scan_bwd_ab: --against {revision!r}: no such file')
        proc = subprocess.run(['git', 'hash-object', revision], capture_output=True, text=True, check=True)
        return proc.stdout.strip()
    proc = subprocess.run(['git', 'rev-parse', '--verify', '--quiet', f'{revision}^{{commit}}'], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f'scan_bwd_ab: --against {revision!r} is not a commit in this checkout')
    return proc.stdout.strip()


def module_at(revision: str, commit: str):
    if revision.endswith('.py'):
        path = revision
    else:
        root = subprocess.run(['git', 'rev-parse', '--show-toplevel'], capture_output=True, text=True,
                              check=True).stdout.strip()
        source = subprocess.run(['git', 'show', f'{commit}:timm_arm/ops/triton_scan.py'], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        path = os.path.join(tempfile.mkdtemp(), f'triton_scan_{commit}.py')
        with open(path, 'w') as f:
            f.write(source)
    spec = importlib.util.spec_from_file_location(f'triton_scan_{commit}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_errs(names, ours, theirs):
    """Largest difference of each pair of gradients, relative to the largest value of the other tree's."""
    return {n: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            for n, a, b in zip(names, ours, theirs)}


def compare(shape, other, iters, sweep, caps=(144, 160, 176, None), segments=(2, 4, 6, 8)):
    t, order = token_inputs(*shape)
    t = {k: v.detach() for k, v in t.items()}
    # as the mixer calls the kernels (A_log, A = -exp(A_log) taken by the kernels' wrappers) where both trees can:
    # a variant can cost registers on that path only
    a_log = all('a_is_log' in inspect.signature(m._scan_backward).parameters for m in (ts, other))
    A = torch.log(-t['A']).contiguous() if a_log else t['A'].contiguous()
    kw = dict(a_is_log=True) if a_log else {}
    args = (t['u'], t['delta'], A, t['B'], t['C'], t['D'], t['delta_bias'], True, order[0].to(torch.int32))
    dy = torch.randn_like(t['u'])
    cfg = ts.scan_config(shape[3], shape[2], shape[4])
    other_cfg = other.scan_config(shape[3], shape[2], shape[4])
    ours = ts._scan_backward(dy, *args, cfg, **kw)
    theirs = other._scan_backward(dy, *args, other_cfg, **kw)
    row = dict(shape=shape[:5], config=cfg._asdict(), other_config=other_cfg._asdict(), a_is_log=a_log,
               rel_err=rel_errs(GRADS, ours, theirs))
    for rep in range(2):
        row[f'other_bwd_ms_{rep}'] = cuda_median_ms(lambda: other._scan_backward(dy, *args, other_cfg, **kw), iters)
        row[f'bwd_ms_{rep}'] = cuda_median_ms(lambda: ts._scan_backward(dy, *args, cfg, **kw), iters)
        row[f'other_fwd_ms_{rep}'] = cuda_median_ms(lambda: other._scan_forward(*args, other_cfg, **kw), iters)
        row[f'fwd_ms_{rep}'] = cuda_median_ms(lambda: ts._scan_forward(*args, cfg, **kw), iters)
    if sweep:
        rows = []
        for M in segments:
            for cap in caps:
                c = cfg._replace(chunks_per_segment=M, max_registers_bwd=cap)
                ms = cuda_median_ms(lambda: ts._scan_backward(dy, *args, c, **kw), iters)
                k = ts._last_kernels['scan_bwd']
                rows.append(dict(ms=ms, chunks_per_segment=M, register_cap=cap, registers=k.n_regs,
                                 spills=k.n_spills))
        row['sweep'] = sorted(rows, key=lambda r: r['ms'])
    return row


def compare_conv(shape, other, iters, sweep):
    """The conv backward (and forward) of both trees on ARM's conv input: x (b, L, d), K directions, width 4."""
    batch, K, seqlen, d, _, grid = shape
    g = torch.Generator(device='cuda').manual_seed(1)
    x = torch.randn(batch, seqlen, 2 * d, device='cuda', generator=g).to(torch.bfloat16)[..., :d]
    w = torch.randn(K, d, 4, device='cuda', generator=g) * .5
    bias = torch.randn(K, d, device='cuda', generator=g)
    order, inverse = (o.to(torch.int32) for o in scan_orders(grid, K, seqlen // 2 if seqlen % 2 else None,
                                                              torch.device('cuda')))
    du = torch.randn(K, batch, seqlen, d, device='cuda', generator=g).to(torch.bfloat16).transpose(0, 1)
    ours = ts._conv_backward(du, x, w, bias, order, inverse)
    theirs = other._conv_backward(du, x, w, bias, order, inverse)
    ours, theirs = (ts._conv_forward(x, w, bias, order), *ours), (other._conv_forward(x, w, bias, order), *theirs)
    row = dict(shape=shape[:5], rel_err=rel_errs(('u', 'dx', 'dw', 'dbias'), ours, theirs))
    for rep in range(2):
        row[f'other_bwd_ms_{rep}'] = cuda_median_ms(lambda: other._conv_backward(du, x, w, bias, order, inverse), iters)
        row[f'bwd_ms_{rep}'] = cuda_median_ms(lambda: ts._conv_backward(du, x, w, bias, order, inverse), iters)
        row[f'other_fwd_ms_{rep}'] = cuda_median_ms(lambda: other._conv_forward(x, w, bias, order), iters)
        row[f'fwd_ms_{rep}'] = cuda_median_ms(lambda: ts._conv_forward(x, w, bias, order), iters)
    if sweep:
        rows, default = [], (ts.CONV_BWD_STEPS, ts.CONV_BWD_BLOCK_D, ts.CONV_BWD_WARPS)
        for tiles in itertools.product((32, 64, 256), (64, 128, 256), (1, 2)):
            ts.CONV_BWD_STEPS, ts.CONV_BWD_BLOCK_D, ts.CONV_BWD_WARPS = tiles
            rows.append(dict(ms=cuda_median_ms(lambda: ts._conv_backward(du, x, w, bias, order, inverse), iters),
                             steps=tiles[0], block_d=tiles[1], warps=tiles[2]))
        ts.CONV_BWD_STEPS, ts.CONV_BWD_BLOCK_D, ts.CONV_BWD_WARPS = default
        row['sweep'] = sorted(rows, key=lambda r: r['ms'])[:8]
        rows, default = [], (ts.CONV_STEPS, ts.CONV_BLOCK_D, ts.CONV_WARPS)
        for tiles in itertools.product((32, 64, 256), (64, 128, 256), (1, 2)):
            ts.CONV_STEPS, ts.CONV_BLOCK_D, ts.CONV_WARPS = tiles
            rows.append(dict(fwd_ms=cuda_median_ms(lambda: ts._conv_forward(x, w, bias, order), iters),
                             steps=tiles[0], block_d=tiles[1], warps=tiles[2]))
        ts.CONV_STEPS, ts.CONV_BLOCK_D, ts.CONV_WARPS = default
        row['sweep_forward'] = sorted(rows, key=lambda r: r['fwd_ms'])[:8]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--against', required=True,
                        help='git revision to compare with, or a saved copy of triton_scan.py (a .py file)')
    parser.add_argument('--shapes', default='0,1', help='indices into scan_kernels.SHAPES')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--conv', action='store_true', help='compare the causal conv instead of the scan')
    parser.add_argument('--caps', default='144,160,176,none', help='--sweep: register caps of the scan backward')
    parser.add_argument('--segments', default='2,4,6,8', help='--sweep: chunks per segment of the scan backward')
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    commit = resolve(args.against)  # before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit('scan_bwd_ab: needs a CUDA device')
    print(f'against {args.against} = {commit}', flush=True)
    other = module_at(args.against, commit)
    rows = []
    caps = tuple(None if c == 'none' else int(c) for c in args.caps.split(','))
    segments = tuple(map(int, args.segments.split(',')))
    for i in map(int, args.shapes.split(',')):
        if args.conv:
            row = compare_conv(SHAPES[i], other, args.iters, args.sweep)
        else:
            row = compare(SHAPES[i], other, args.iters, args.sweep, caps, segments)
            if args.sweep:
                print('  scan backward (segments, cap), fastest first:', [
                    (r['chunks_per_segment'], r['register_cap'], round(r['ms'], 3), r['registers'], r['spills'])
                    for r in row['sweep'][:6]], flush=True)
        rows.append(row)
        if args.conv and args.sweep:
            print('  conv backward tiles, fastest first:', row['sweep'][:4], flush=True)
            print('  conv forward tiles, fastest first:', row['sweep_forward'][:4],
                  flush=True)
        bwd, other_bwd, fwd, other_fwd = (min(row[f'{p}_ms_{r}'] for r in range(2))
                                          for p in ('bwd', 'other_bwd', 'fwd', 'other_fwd'))
        print(f'{"conv" if args.conv else "scan"} {SHAPES[i][:5]}: backward {bwd:.3f} ms vs {other_bwd:.3f} ms at '
              f'{commit[:10]} ({other_bwd / bwd:.2f}x), forward {fwd:.3f} vs {other_fwd:.3f} ms; worst gradient '
              f'difference {max(row["rel_err"].values()):.1e}', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(), against=args.against, commit=commit, rows=rows), f,
                      indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
