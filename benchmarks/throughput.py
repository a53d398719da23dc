""" Throughput of ARM against timm's ViTs of the same size: one run, one card, same settings.

    python benchmarks/throughput.py [--models base,large,huge] [--backends triton,cuda] [--profile]
                                    [--json benchmarks/results/<card>_<date>.json]

For each size: inference img/s (batch 256), training img/s (AdamW step; batch 128 for base, 64 for large/huge),
peak training memory, and the ARM / ViT ratios, at 224 px under bf16 autocast, for each timm_arm backend given
(the ratios use the first). Also ARM-B built the naive way (four separate conv -> x_proj -> dt_proj -> scan chains
with flips and copies, on mamba-ssm's kernels), as the reference code builds it. --profile prints where the
CUDA time of an ARM-B and a ViT-B training step goes, per kernel and by kind. Timing: warm-up, then the median of
CUDA-event timed steps.
"""
import argparse
import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import cuda_median_ms, environment

import timm

import timm_arm  # noqa: F401
from timm_arm.ops import causal_conv1d_silu, selective_scan

PAIRS = {  # size: (ViT, its kwargs, ARM, training batch, image size)
    'base': ('vit_base_patch16_224', {}, 'arm_mamba_base', 128, 224),
    'large': ('vit_large_patch16_224', {}, 'arm_mamba_large', 64, 224),
    'huge': ('vit_huge_patch14_224', {}, 'arm_mamba_huge', 64, 224),
    'tiny32': ('vit_tiny_patch16_224', dict(img_size=32, patch_size=4), 'arm_mamba_tiny_patch4_32', 512, 32),
}


class NaiveMixer(nn.Module):
    """The reference construction: one kernel chain per direction, with flips / transposes between them."""

    def __init__(self, mixer):
        super().__init__()
        self.m = mixer

    def forward(self, x, order):
        m = self.m
        d, N, R = m.d_inner, m.d_state, m.dt_rank
        xz = m.in_proj(x).transpose(1, 2)  # (B, 2d, L)
        total = 0
        for k in range(m.num_directions):
            seq = xz.index_select(-1, order[0][k])
            u = causal_conv1d_silu(seq[:, :d].contiguous(), m.conv_weight[k], m.conv_bias[k], backend='cuda')
            dt, B, C = F.linear(u.transpose(1, 2), m.x_proj_weight[k]).split([R, N, N], dim=-1)
            delta = F.linear(dt, m.dt_proj_weight[k]).transpose(1, 2)
            y = selective_scan(u, delta.contiguous(), -torch.exp(m.A_log[k].float()), B.transpose(1, 2).unsqueeze(1),
                               C.transpose(1, 2).unsqueeze(1), m.D[k], seq[:, d:].contiguous(), m.dt_proj_bias[k], True,
                               backend='cuda')
            total = total + y.index_select(-1, order[1][k])
        return m.out_proj((total / m.num_directions).transpose(1, 2))


def naive(model):
    for block in model.blocks:
        block.mixer = NaiveMixer(block.mixer)
    return model


def measure(name, model, infer_batch, train_batch, iters, warmup, img_size=224):
    model = model.cuda()
    row = dict(model=name, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1), img_size=img_size)
    model.eval()
    x = torch.randn(infer_batch, 3, img_size, img_size, device='cuda')
    with torch.inference_mode(), torch.autocast('cuda', torch.bfloat16):
        row['infer_img_s'] = infer_batch / (cuda_median_ms(lambda: model(x), iters, warmup) / 1000)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(train_batch, 3, img_size, img_size, device='cuda')
    y = torch.randint(0, 1000, (train_batch,), device='cuda')

    def step():
        with torch.autocast('cuda', torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    torch.cuda.reset_peak_memory_stats()
    row['train_img_s'] = train_batch / (cuda_median_ms(step, iters, warmup) / 1000)
    row['train_peak_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
    row['train_batch'], row['infer_batch'] = train_batch, infer_batch
    opt = model = None  # free the GPU memory before the next model
    torch.cuda.empty_cache()
    return row


KERNEL_KINDS = [  # kernel-name keywords of each kind, first match wins
    ('scan', ('_scan_',)), ('conv', ('_conv_',)), ('attention', ('flash', 'fmha', 'attention')),
    ('matmul', ('nvjet', 'gemm', 'cutlass', 'sm90_xmma', 'cublas')), ('norm', ('layer_norm', 'GammaBeta')),
    ('reduce', ('reduce_kernel',)), ('copy / cast', ('copy',)), ('optimizer', ('multi_tensor', 'fused_adam')),
]


def profile(name, model, batch, steps=3):
    """Print the CUDA kernel-time table of training steps (forward, backward, AdamW) and its sum by kind."""
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 224, 224, device='cuda')
    y = torch.randint(0, 1000, (batch,), device='cuda')

    def step():
        with torch.autocast('cuda', torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f'{name}: kernel time per step: {total / steps / 1e3:.1f} ms')
    kinds = {}
    for e in events:
        kind = next((k for k, words in KERNEL_KINDS if any(w in e.key for w in words)), 'other')
        kinds[kind] = kinds.get(kind, 0) + e.self_device_time_total
    print('  ' + ', '.join(f'{k} {v / steps / 1e3:.1f} ms' for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:30]:
        print(f'  {100 * e.self_device_time_total / total:5.1f} %  {e.self_device_time_total / steps / 1e3:7.2f} ms  '
              f'{e.count // steps:4d}x  {e.key[:90]}')
    opt = model = None  # free the GPU memory before the next model
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='base,large,huge')
    parser.add_argument('--infer-batch', type=int, default=256)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--no-naive', action='store_true')
    parser.add_argument('--backends', default='triton,cuda', help='timm_arm backends to time the ARM models with')
    parser.add_argument('--profile', action='store_true',
                        help='kernel-time tables of an ARM-B and a ViT-B training step')
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    backends = args.backends.split(',')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows, ratios = [], []
    for size in args.models.split(','):
        vit_name, vit_kwargs, arm_name, train_batch, img_size = PAIRS[size]
        vit = measure(vit_name, timm.create_model(vit_name, **vit_kwargs), args.infer_batch, train_batch, args.iters,
                      args.warmup, img_size)
        rows.append(vit)
        arm = None
        for i, backend in enumerate(backends):
            timm_arm.set_backend(backend)
            row = measure(f'{arm_name} [{backend}]', timm.create_model(arm_name), args.infer_batch, train_batch,
                          args.iters, args.warmup, img_size)
            row['backend'] = backend
            rows.append(row)
            arm = arm or row  # the ratios use the first backend
            if args.profile and i == 0 and size == 'base':
                profile(vit_name, timm.create_model(vit_name), train_batch)
                profile(arm_name, timm.create_model(arm_name), train_batch)
        timm_arm.set_backend(None)
        if size == 'base' and not args.no_naive:
            rows.append(measure('arm_mamba_base (naive 4 chains)', naive(timm.create_model(arm_name)),
                                args.infer_batch, train_batch, args.iters, args.warmup))
        ratios.append(dict(size=size, backend=backends[0], infer=arm['infer_img_s'] / vit['infer_img_s'],
                           train=arm['train_img_s'] / vit['train_img_s'],
                           memory=arm['train_peak_gib'] / vit['train_peak_gib']))
    device = torch.cuda.get_device_name()
    print(f'device: {device}, torch {torch.__version__}, timm {timm.__version__}, bf16 autocast')
    print(f"{'model':<34}{'params M':>9}{'infer img/s':>13}{'train img/s':>13}{'train GiB':>11}")
    for r in rows:
        print(f"{r['model']:<34}{r['params_m']:>9.1f}{r['infer_img_s']:>13.0f}{r['train_img_s']:>13.0f}"
              f"{r['train_peak_gib']:>11.1f}")
    for r in ratios:
        print(f"ARM/ViT {r['size']:<6} [{r['backend']}] infer {r['infer']:.2f}x  train {r['train']:.2f}x  "
              f"memory {r['memory']:.2f}x")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(benchmark='throughput', **environment(), rows=rows, ratios=ratios), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
