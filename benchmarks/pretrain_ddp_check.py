""" 1 vs N processes: the same global batch must give the same per-step losses.

Runs N pretraining updates (fixed seed, synthetic image folder, float32 by default) through the real training
loop and prints the global loss of every step; rank 0 writes them as JSON. Compare two runs with --compare.

    torchrun --nproc-per-node 1 benchmarks/pretrain_ddp_check.py --json /tmp/ddp1.json
    torchrun --nproc-per-node 2 benchmarks/pretrain_ddp_check.py --json /tmp/ddp2.json
    python benchmarks/pretrain_ddp_check.py --compare /tmp/ddp1.json /tmp/ddp2.json   # prints max diff, PASS/FAIL

Data order and augmentation do not depend on the world size (timm_arm.pretrain.data), so the runs see the same
pixels; differences come only from reduction order (expect ~1e-5 relative in float32; TF32 / bf16 more).
Add --device cpu to run it with gloo on CPU.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_arm.pretrain.cli import parse_args  # noqa: E402
from timm_arm.pretrain.train import train  # noqa: E402


def _make_images(root: str, num: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(num):
        folder = os.path.join(root, f'c{i % 4}')
        os.makedirs(folder, exist_ok=True)
        # smooth random images (low-frequency noise, upsampled) so the loss has something to learn
        small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(os.path.join(folder, f'{i:05d}.png'))


def compare(a_path: str, b_path: str, rtol: float) -> int:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    la, lb = np.array(a['losses']), np.array(b['losses'])
    if len(la) != len(lb):
        print(f'FAIL: {len(la)} vs {len(lb)} steps')
        return 1
    rel = np.abs(la - lb) / np.maximum(np.abs(la), 1e-12)
    for i, (x, y, r) in enumerate(zip(la, lb, rel)):
        print(f'step {i + 1:4d}  {x:.6f}  {y:.6f}  rel diff {r:.2e}')
    ok = rel.max() <= rtol
    print(f'world {a["world_size"]} vs {b["world_size"]}, global batch {a["batch_size"]}: '
          f'max rel diff {rel.max():.2e} (rtol {rtol:g}) -> {"PASS" if ok else "FAIL"}')
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--batch-size', type=int, default=32, help='global batch')
    parser.add_argument('--model', default='arm_mamba_tiny')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--model-kwargs', nargs='*', default=['patch_size=8', 'cluster_size=2'])
    parser.add_argument('--amp-dtype', default='float32')
    parser.add_argument('--device', default='')
    parser.add_argument('--workdir', default='/tmp/arm_ddp_check')
    parser.add_argument('--json', default='')
    parser.add_argument('--compare', nargs=2, metavar='JSON')
    parser.add_argument('--rtol', type=float, default=1e-3)
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare, args.rtol)

    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    use_cuda = (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if world > 1:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo',
                                device_id=torch.device('cuda', local_rank) if use_cuda else None)
    data, out = os.path.join(args.workdir, 'data'), os.path.join(args.workdir, f'run_world{world}')
    if rank == 0:
        if not os.path.isdir(data):
            _make_images(data, num=args.batch_size * args.steps, size=args.img_size + 16)
        shutil.rmtree(out, ignore_errors=True)
    if world > 1:
        dist.barrier()
    train_args = parse_args([
        '--data-dir', data, '--output', out, '--model', args.model, '--img-size', str(args.img_size),
        '--model-kwargs', *args.model_kwargs, '-b', str(args.batch_size), '--epochs', '1', '--warmup-epochs', '0',
        '--blr', '1e-3', '--max-steps', str(args.steps), '--log-interval', '1', '--ckpt-interval', '100000',
        '--amp-dtype', args.amp_dtype, '--workers', '2', '--no-progress', '--no-export', '--seed', '0',
        *(['--device', args.device] if args.device else [])])
    train(train_args)  # destroys the process group at its end
    if rank == 0:
        records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
        losses = [r['loss'] for r in records]
        for r in records:
            print(f'step {r["step"]:4d}  loss {r["loss"]:.6f}  lr {r["lr"]:.2e}')
        if args.json:
            json.dump(dict(world_size=world, batch_size=args.batch_size, losses=losses), open(args.json, 'w'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
