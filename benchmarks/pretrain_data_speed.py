""" AR pretraining speed by data path: a synthetic batch already on the GPU (the model's own step rate), the
in-memory path (images decoded once, cropped and flipped on the GPU), and worker processes decoding JPEGs.

    python benchmarks/pretrain_data_speed.py -c recipes/pretrain/arm_mamba_tiny_patch4_32_cifar10.yaml \
        --data-dir DIR --json benchmarks/results/pretrain_data_speed_h100.json

Every path runs the pretraining step of the recipe (its model, global batch, bf16 autocast, AdamW, gradient
clipping), one after another in one process on one GPU; the in-memory and worker rates are also given as a
fraction of the synthetic rate.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

import timm
from timm.optim import create_optimizer_v2

from timm_arm.models.arm_pretrain import create_pretrainer
from timm_arm.pretrain.cli import parse_args
from timm_arm.pretrain.data import WorkerLoader, open_dataset
from timm_arm.pretrain.in_memory import InMemoryLoader, decode_images


def _commit() -> str:
    if os.environ.get('TIMM_ARM_COMMIT'):
        return os.environ['TIMM_ARM_COMMIT']
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get('TIMM_ARM_COMMIT', 'unknown')


def _time_steps(model, optimizer, batches, steps: int, warmup: int, batch_size: int, clip: float) -> dict:
    """img/s over `steps` steps after `warmup` steps; the batches come from an iterator (data time included).
    As in the training loop, nothing waits for the GPU between steps."""
    autocast = torch.autocast('cuda', dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device='cuda')
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        images = next(batches).cuda(non_blocking=True)
        with autocast:
            loss = model(images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(img_per_s=steps * batch_size / seconds, step_ms=1000 * seconds / steps,
                mean_loss=loss_sum.item() / (warmup + steps))


def _endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-c', '--config', required=True, help='pretraining recipe (model, batch, image size)')
    parser.add_argument('--data-dir', required=True, help='image folder (DIR/train/<class>/*.jpg or DIR/<class>/...)')
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--warmup', type=int, default=15)
    parser.add_argument('--workers', type=int, default=0, help='worker processes of the worker path (0: all CPUs)')
    parser.add_argument('--json', default='', help='write the results here')
    opts = parser.parse_args()
    args = parse_args(['-c', opts.config, '--data-dir', opts.data_dir])
    workers = opts.workers or len(os.sched_getaffinity(0))

    torch.manual_seed(0)
    model = create_pretrainer(args.model, img_size=args.img_size, **args.model_kwargs).cuda().train()
    lr = args.blr * args.batch_size / 256
    optimizer = create_optimizer_v2(model, opt='adamw', lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    dataset = open_dataset(args.dataset, args.data_dir, split=args.train_split)
    common = dict(steps=opts.steps, warmup=opts.warmup, batch_size=args.batch_size, clip=args.clip_grad)

    started = time.perf_counter()
    images = decode_images(dataset, int(args.in_memory_max_gb * 2 ** 30), workers=workers)
    decode_s = time.perf_counter() - started
    in_memory = InMemoryLoader(images.cuda(), args.batch_size, args.img_size, seed=args.seed, scale=tuple(args.scale))
    fixed = next(iter(in_memory))

    def synthetic():
        while True:
            yield fixed

    rows = {'synthetic': _time_steps(model, optimizer, synthetic(), **common)}
    rows['in_memory'] = _time_steps(model, optimizer, _endless(in_memory), **common)
    rows['in_memory']['decode_s'] = decode_s
    workers_loader = WorkerLoader(dataset, args.batch_size, args.img_size, seed=args.seed, scale=tuple(args.scale),
                                  workers=workers, pin_memory=True)
    rows['workers'] = _time_steps(model, optimizer, _endless(workers_loader), **common)
    rows['workers']['workers'] = workers
    for row in rows.values():
        row['vs_synthetic'] = row['img_per_s'] / rows['synthetic']['img_per_s']

    print(f'{args.model} pretraining, {args.img_size} px, global batch {args.batch_size}, '
          f'{torch.cuda.get_device_name()}')
    print(f'{"data path":12s} {"img/s":>9s} {"step ms":>8s} {"vs synthetic":>13s}')
    for name, row in rows.items():
        print(f'{name:12s} {row["img_per_s"]:9.0f} {row["step_ms"]:8.2f} {row["vs_synthetic"]:13.2f}')
    result = dict(
        benchmark='pretrain_data_speed', recipe=opts.config, model=args.model, img_size=args.img_size,
        batch_size=args.batch_size, num_images=len(dataset), steps=opts.steps, warmup=opts.warmup, paths=rows,
        card=torch.cuda.get_device_name(), cpus=len(os.sched_getaffinity(0)), commit=_commit(),
        date=time.strftime('%Y-%m-%d'), versions=dict(torch=torch.__version__, timm=timm.__version__,
                                                      python=platform.python_version()))
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, 'w') as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
