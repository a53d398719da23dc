""" Checks the Triton selective scan against the sequential reference: forward and every gradient.

    python tests/triton_scan_check.py [--quick]

On a machine without a CUDA device it runs Triton's CPU interpreter (TRITON_INTERPRET=1, set here before triton
is imported, so run it as its own process); tests/test_triton_scan.py runs it in a subprocess. Prints one line
per case and exits non-zero on any failure.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'

from timm_arm.ops.selective_scan import selective_scan_sequential  # noqa: E402
from timm_arm.ops.triton_scan import ScanConfig, selective_scan_triton  # noqa: E402

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
CONFIGS = [None, ScanConfig(T=16, block_d_fwd=2, warps_fwd=1, T_bwd=4, block_d_bwd=4, warps_bwd=1),
           ScanConfig(T=4, block_d_fwd=4, warps_fwd=2, T_bwd=4, block_d_bwd=2, warps_bwd=1)]


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


def main():
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    quick = '--quick' in sys.argv
    ok = check_layouts_and_dtypes(device)
    for shape, options in CASES:
        for config in CONFIGS[:1] if quick else CONFIGS:
            ok &= check(shape, options, device, config)
    print('ALL OK' if ok else 'FAILURES')
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
