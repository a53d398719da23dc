""" Where a training step's host (Python) time goes: the forward's issue time against its wall time, then a
cProfile of whole training steps, sorted by own time.

    python benchmarks/kernels/host_profile.py [--model arm_mamba_large] [--batch 64] [--steps 5] [--top 35]

bf16 autocast, fused AdamW, ``loss.item()`` every step (as timm's train.py), 224 px. Needs a GPU.
"""
import argparse
import cProfile
import io
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import timm

import timm_arm  # noqa: F401


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='arm_mamba_large')
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--top', type=int, default=35)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('host_profile: needs a CUDA device')
    torch.backends.cuda.matmul.allow_tf32 = True
    model = timm.create_model(args.model).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, 224, 224, device='cuda')
    y = torch.randint(0, 1000, (args.batch,), device='cuda')

    def step():
        with torch.autocast('cuda', torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast('cuda', torch.bfloat16):
            out = model(x)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        times.append((t1 - t0, time.perf_counter() - t0))
        del out
    print(f'{args.model} b{args.batch}: forward issued in / wall (ms):',
          ', '.join(f'{a * 1e3:.1f} / {b * 1e3:.1f}' for a, b in times))
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        step()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats('tottime').print_stats(args.top)
    print(text.getvalue())
    return 0


if __name__ == '__main__':
    sys.exit(main())
