""" DDP scaling of the ARM pretraining step: img/s at a fixed global batch on 1..N GPUs (synthetic images).

    torchrun --nproc-per-node 1 benchmarks/pretrain_ddp_speed.py --batch-size 256
    torchrun --nproc-per-node 2 benchmarks/pretrain_ddp_speed.py --batch-size 256

Same step as the training loop (bf16 autocast, fused AdamW, grad clip 3.0) without data loading, so that the
number measures compute and gradient all-reduce only. Rank 0 prints img/s; --json appends a record.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from timm_arm.models import create_pretrainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='arm_mamba_base')
    parser.add_argument('--img-size', type=int, default=192)
    parser.add_argument('--batch-size', type=int, default=256, help='global batch')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (('WORLD_SIZE', 1), ('RANK', 0), ('LOCAL_RANK', 0)))
    torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group('nccl', device_id=torch.device('cuda', local))
    torch.manual_seed(rank)
    model = create_pretrainer(args.model, img_size=args.img_size).cuda()
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[local])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(.9, .95), fused=True)
    x = torch.randn(args.batch_size // world, 3, args.img_size, args.img_size, device='cuda')

    def step():
        with torch.autocast('cuda', torch.bfloat16):
            loss = model(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    img_s = args.batch_size * args.steps / (start.elapsed_time(end) / 1000)
    if rank == 0:
        print(f'{args.model} {args.img_size}px global batch {args.batch_size} on {world} GPU(s): {img_s:.0f} img/s')
        if args.json:
            with open(args.json, 'a') as f:
                f.write(json.dumps(dict(model=args.model, world_size=world, batch_size=args.batch_size,
                                        img_per_s=img_s, device=torch.cuda.get_device_name())) + '\n')
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
