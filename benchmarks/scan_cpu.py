""" The pure-PyTorch parallel scan against the plain sequential loop, on CPU, forward and forward + backward.

    python benchmarks/scan_cpu.py [--json OUT.json]

The sequential loop is the textbook recurrence (one step per token, indexing the precomputed tensors), the form of
the reference implementations; both compute in fp32. Prints ms per call and the speed-up for ARM shapes at L = 197.
"""
import argparse
import json
import platform
import time

import torch

from timm_arm.ops import selective_scan_sequential, selective_scan_torch

SHAPES = [  # (batch, directions, d_inner, L, d_state)
    (1, 4, 192, 197, 16),   # arm_mamba_tiny layer, one image
    (2, 4, 192, 197, 16),
    (1, 4, 768, 197, 16),   # arm_mamba_base layer, one image
]


def bench(fn, args, backward, repeat):
    def run():
        out = fn(*args, delta_softplus=True)
        if backward:
            out.sum().backward()
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    rows = []
    print(f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}')
    print(f"{'shape (b, K, d, L, N)':<26}{'mode':<9}{'sequential ms':>15}{'parallel ms':>13}{'speed-up':>10}")
    for shape in SHAPES:
        b, K, d, L, N = shape
        torch.manual_seed(0)
        tensors = [torch.randn(b, K * d, L), torch.randn(b, K * d, L) * .5, -torch.rand(K * d, N) * 4,
                   torch.randn(b, K, N, L), torch.randn(b, K, N, L), torch.randn(K * d), torch.randn(b, K * d, L),
                   torch.randn(K * d)]
        for mode in ('fwd', 'fwd+bwd'):
            inputs = [t.clone().requires_grad_(mode != 'fwd') for t in tensors]
            with torch.set_grad_enabled(mode != 'fwd'):
                seq = bench(selective_scan_sequential, inputs, mode != 'fwd', args.repeat)
                par = bench(selective_scan_torch, inputs, mode != 'fwd', args.repeat)
            rows.append(dict(shape=shape, mode=mode, sequential_ms=seq, parallel_ms=par, speedup=seq / par))
            print(f'{str(shape):<26}{mode:<9}{seq:>15.1f}{par:>13.1f}{seq / par:>9.1f}x')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(threads=torch.get_num_threads(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
