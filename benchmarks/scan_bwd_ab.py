""" The Triton scan backward of this tree against the one of another git revision, same run, same inputs.

    python benchmarks/scan_bwd_ab.py --against e4371a5 [--json OUT.json] [--shapes 0,1] [--sweep]

For each shape (benchmarks/scan_kernels.SHAPES) it loads ``timm_arm/ops/triton_scan.py`` as it was at the other
revision (``git show``, into a temporary module), checks that both give the same gradients (relative to the
largest reference value: bf16 outputs differ by rounding only), and times both backwards (and forwards) twice,
alternating, median of CUDA-event timings. --sweep also times this tree's backward over segment lengths and
register caps. Needs a GPU and the git history of this checkout.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import torch

from _timing import cuda_median_ms
from scan_kernels import SHAPES, token_inputs
from timm_arm.ops import triton_scan as ts

GRADS = ('du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'dbias')


def resolve(revision: str) -> str:
    """The full hash a revision names in this checkout (a copied tree's HEAD may not be the commit you expect)."""
    proc = subprocess.run(['git', 'rev-parse', '--verify', '--quiet', f'{revision}^{{commit}}'], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f'scan_bwd_ab: --against {revision!r} is not a commit in this checkout')
    return proc.stdout.strip()


def module_at(revision: str):
    root = subprocess.run(['git', 'rev-parse', '--show-toplevel'], capture_output=True, text=True,
                          check=True).stdout.strip()
    source = subprocess.run(['git', 'show', f'{revision}:timm_arm/ops/triton_scan.py'], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f'triton_scan_{revision}.py')
    with open(path, 'w') as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f'triton_scan_{revision}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(shape, other, iters, sweep):
    t, order = token_inputs(*shape)
    t = {k: v.detach() for k, v in t.items()}
    args = (t['u'], t['delta'], t['A'].contiguous(), t['B'], t['C'], t['D'], t['delta_bias'], True,
            order[0].to(torch.int32))
    dy = torch.randn_like(t['u'])
    cfg = ts.scan_config(shape[3], shape[2], shape[4])
    other_cfg = other.scan_config(shape[3], shape[2], shape[4])
    ours = ts._scan_backward(dy, *args, cfg)
    theirs = other._scan_backward(dy, *args, other_cfg)
    row = dict(shape=shape[:5], config=cfg._asdict(), other_config=other_cfg._asdict(), rel_err={
        n: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        for n, a, b in zip(GRADS, ours, theirs)})
    for rep in range(2):
        row[f'other_bwd_ms_{rep}'] = cuda_median_ms(lambda: other._scan_backward(dy, *args, other_cfg), iters)
        row[f'bwd_ms_{rep}'] = cuda_median_ms(lambda: ts._scan_backward(dy, *args, cfg), iters)
        row[f'other_fwd_ms_{rep}'] = cuda_median_ms(lambda: other._scan_forward(*args, other_cfg), iters)
        row[f'fwd_ms_{rep}'] = cuda_median_ms(lambda: ts._scan_forward(*args, cfg), iters)
    if sweep:
        rows = []
        for M in (2, 4, 6, 8):
            for cap in (144, 160, 176, None):
                c = cfg._replace(chunks_per_segment=M, max_registers_bwd=cap)
                ms = cuda_median_ms(lambda: ts._scan_backward(dy, *args, c), iters)
                k = ts._last_kernels['scan_bwd']
                rows.append(dict(ms=ms, chunks_per_segment=M, register_cap=cap, registers=k.n_regs,
                                 spills=k.n_spills))
        row['sweep'] = sorted(rows, key=lambda r: r['ms'])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--against', required=True, help='git revision to compare with')
    parser.add_argument('--shapes', default='0,1', help='indices into scan_kernels.SHAPES')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    commit = resolve(args.against)  # before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit('scan_bwd_ab: needs a CUDA device')
    print(f'against {args.against} = {commit}', flush=True)
    other = module_at(commit)
    rows = []
    for i in map(int, args.shapes.split(',')):
        row = compare(SHAPES[i], other, args.iters, args.sweep)
        rows.append(row)
        bwd, other_bwd = (min(row[f'{p}bwd_ms_{r}'] for r in range(2)) for p in ('', 'other_'))
        print(f'{SHAPES[i][:5]}: backward {bwd:.3f} ms vs {other_bwd:.3f} ms at {commit[:10]} '
              f'({other_bwd / bwd:.2f}x); worst gradient difference '
              f'{max(row["rel_err"].values()):.1e}', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(), against=args.against, commit=commit, rows=rows), f,
                      indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
