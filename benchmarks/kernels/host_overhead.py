""" How much of a training step is host time: per model, the host time to issue a step against its wall time,
the same forward + backward replayed as one CUDA graph (the upper bound of what less host work can give), and a
trace's GPU idle gaps split into those where the host issued the next kernel late and the rest.

    python benchmarks/kernels/host_overhead.py [--models arm_mamba_base:128,vit_base_patch16_224:128] [--no-trace]

bf16 autocast, AdamW (fused) for the issue / wall timing, 224 px; one line per model, plus the kernels most
often waited for. Needs a GPU.
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import timm

import timm_arm  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from _common import cuda_median_ms  # noqa: E402


def step_fn(model, batch, cache_enabled=True):
    x = torch.randn(batch, 3, 224, 224, device='cuda')
    y = torch.randint(0, 1000, (batch,), device='cuda')

    def forward_backward():
        with torch.autocast('cuda', torch.bfloat16, cache_enabled=cache_enabled):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    return forward_backward


def issue_and_wall_ms(step, iters=8):
    """Median host time until step() returns, and median wall time until its kernels are done."""
    issue, wall = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        issue.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return sorted(issue)[iters // 2] * 1e3, sorted(wall)[iters // 2] * 1e3


def graph_ms(model, batch):
    """fwd + bwd eager vs the same captured as one CUDA graph (autocast's weight cache off, as capture needs)."""
    fb = step_fn(model, batch, cache_enabled=False)
    eager = cuda_median_ms(fb, 10, 3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            fb()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fb()
    graphed = cuda_median_ms(graph.replay, 10, 3)
    del graph
    return eager, graphed


def trace_gaps(step, steps=3):
    """GPU idle time per step between kernels: 'host late' where the next kernel's launch call returned after
    the previous kernel had finished, else 'device'; and the kernels most waited for by the host."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)['traceEvents']
    kernels = sorted((e for e in events if e.get('ph') == 'X' and e.get('cat') in ('kernel', 'gpu_memset',
                                                                                    'gpu_memcpy')),
                     key=lambda e: e['ts'])
    launches = {e['args'].get('correlation'): e for e in events if e.get('ph') == 'X'
                and e.get('cat') in ('cuda_runtime', 'cuda_driver') and 'args' in e}
    late = device = 0.
    waited = collections.Counter()
    for prev, kernel in zip(kernels, kernels[1:]):
        done = prev['ts'] + prev['dur']
        gap = kernel['ts'] - done
        if gap <= 0:
            continue
        launch = launches.get(kernel['args'].get('correlation'))
        if launch is not None and launch['ts'] + launch['dur'] > done:
            late += gap
            waited[kernel['name'][:48]] += gap
        else:
            device += gap
    busy = sum(k['dur'] for k in kernels)
    return dict(kernels_per_step=len(kernels) // steps, kernel_ms=busy / steps / 1e3,
                host_late_gap_ms=late / steps / 1e3, device_gap_ms=device / steps / 1e3,
                most_waited=[(name, round(us / steps)) for name, us in waited.most_common(5)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='vit_base_patch16_224:128,arm_mamba_base:128,'
                                            'vit_large_patch16_224:64,arm_mamba_large:64')
    parser.add_argument('--no-trace', action='store_true')
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('host_overhead: needs a CUDA device')
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for spec in args.models.split(','):
        name, batch = spec.split(':')
        model = timm.create_model(name).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fb = step_fn(model, int(batch))

        def step():
            fb()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(3):
            step()
        issue, wall = issue_and_wall_ms(step)
        eager, graphed = graph_ms(model, int(batch))
        row = dict(model=name, batch=int(batch), issue_ms=issue, wall_ms=wall, fwd_bwd_eager_ms=eager,
                   fwd_bwd_graph_ms=graphed)
        if not args.no_trace:
            row.update(trace_gaps(step))
        rows.append(row)
        print(f"{name} b{batch}: step issued in {issue:.1f} ms of host time, {wall:.1f} ms wall; fwd+bwd eager "
              f"{eager:.1f} ms vs CUDA graph {graphed:.1f} ms ({eager / graphed:.3f}x)"
              + ('' if args.no_trace else f"; {row['kernels_per_step']} kernels, {row['kernel_ms']:.1f} ms kernel "
                 f"time, GPU idle {row['host_late_gap_ms']:.1f} ms waiting for the host + "
                 f"{row['device_gap_ms']:.1f} ms between kernels; waited for most: {row['most_waited'][:3]}"),
              flush=True)
        opt = model = None  # free the GPU memory before the next model
        torch.cuda.empty_cache()
    print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
