""" ARM on a CPU (the pure-PyTorch path) against timm's ViT of the same width, depth and patch grid: forward, fp32.

    python benchmarks/cpu_speed.py [--pairs tiny,tiny32] [--batch-size 64] \
        [--json benchmarks/results/cpu_speed_cpu2.json]

Each pair in one process, same threads (torch's default: the CPUs this process may use), the two models' forward
passes interleaved; median of --iters passes each after one warm-up. Prints img/s of both and the ratio ARM / ViT.
"""
import argparse
import json
import sys
import time

import torch
from _common import environment

import timm

import timm_arm  # noqa: F401  registers the models

PAIRS = {  # name: (ARM, its kwargs, ViT, its kwargs, image size)
    'tiny': ('arm_mamba_tiny', {}, 'vit_tiny_patch16_224', {}, 224),
    'tiny32': ('arm_mamba_tiny_patch4_32', {}, 'vit_tiny_patch16_224', dict(img_size=32, patch_size=4), 32),
}


def forward_img_per_s(models, batch: int, img_size: int, iters: int):
    """Median img/s of each model's forward, the models' passes interleaved (the same machine state for both)."""
    x = torch.randn(batch, 3, img_size, img_size)
    times = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model.eval()(x)  # warm-up
        for _ in range(iters):
            for model, t in zip(models, times):
                start = time.perf_counter()
                model(x)
                t.append(time.perf_counter() - start)
    return [batch / sorted(t)[len(t) // 2] for t in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', default='tiny,tiny32', help=f'comma-separated, of {",".join(PAIRS)}')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    rows = []
    for name in args.pairs.split(','):
        arm_name, arm_kwargs, vit_name, vit_kwargs, img_size = PAIRS[name]
        torch.manual_seed(0)
        models = [timm.create_model(arm_name, **arm_kwargs), timm.create_model(vit_name, **vit_kwargs)]
        arm, vit = forward_img_per_s(models, args.batch_size, img_size, args.iters)
        rows.append(dict(pair=name, arm=arm_name, vit=vit_name, vit_kwargs=vit_kwargs, img_size=img_size,
                         batch_size=args.batch_size, arm_img_per_s=arm, vit_img_per_s=vit, ratio=arm / vit))
        print(f'{name:8s} {img_size:4d} px  {arm_name} {arm:7.1f} img/s   {vit_name} {vit:7.1f} img/s   '
              f'ARM / ViT {arm / vit:.2f}x', flush=True)
    env = environment()
    print(f'{env["device"]}, torch {env["torch"]}, fp32 forward, batch {args.batch_size}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(benchmark='cpu_speed', **env, rows=rows), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
