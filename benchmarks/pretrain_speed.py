""" Pretraining step speed: ARM (arm_mamba_base, 192 px) vs MAE ViT-B/16 (75 % masking, 8 x 512 decoder).

One full training step each (forward, backward, AdamW update; bf16 autocast), same batch, one GPU, one run:

    python benchmarks/pretrain_speed.py --batch-size 128 --json results/pretrain_speed.json

Prints img/s, step time and peak memory of both and the ratio ARM / MAE. MAE is built from timm's ViT pieces
(PatchEmbed, Block) as in the MAE paper; by default it runs at its native 224 px (--mae-img-size 192 for the
same pixels as ARM).
"""
import argparse
import json
import os
import sys
import time
from functools import partial

import torch
import torch.nn as nn

from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_arm.models.arm_pretrain import create_pretrainer  # noqa: E402


class MaePretrainer(nn.Module):
    """MAE (He et al. 2022): encoder on the 25 % visible patches, decoder with mask tokens, normalised-pixel loss."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=16, mask_ratio=0.75):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.mask_ratio = patch_size, mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer('pos_embed', build_sincos2d_pos_embed(list(grid), embed_dim).unsqueeze(0))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, 4., qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer('decoder_pos_embed', build_sincos2d_pos_embed(list(grid), decoder_embed_dim)[None])
        self.decoder_blocks = nn.Sequential(*[Block(decoder_embed_dim, decoder_num_heads, 4., qkv_bias=True,
                                                    norm_layer=norm) for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed
        B, N, C = x.shape
        keep = int(N * (1 - self.mask_ratio))
        ids_shuffle = torch.rand(B, N, device=x.device).argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        x = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, C))
        x = self.norm(self.blocks(torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)))
        x = self.decoder_embed(x)
        D = x.shape[-1]
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, N - keep, -1)], dim=1)
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, D)) + self.decoder_pos_embed
        x = self.decoder_blocks(torch.cat([x[:, :1], x_], dim=1))
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p = self.patch_size
        t = imgs.float().reshape(B, 3, imgs.shape[2] // p, p, imgs.shape[3] // p, p).permute(0, 2, 4, 3, 5, 1)
        t = t.reshape(B, N, p * p * 3)
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        mask = torch.ones(B, N, device=x.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, ids_restore)
        return (((pred.float() - t) ** 2).mean(-1) * mask).sum() / mask.sum()


def bench(name: str, model: nn.Module, img_size: int, args) -> dict:
    device = torch.device('cuda')
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            fused=True)
    images = torch.randn(args.batch_size, 3, img_size, img_size, device=device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = model(images)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / args.steps)
    t = sorted(times)[len(times) // 2]
    result = dict(
        model=name, img_size=img_size, batch_size=args.batch_size, step_ms=t * 1e3, img_per_s=args.batch_size / t,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    print(f'{name:32s} {img_size:4d}px  step {result["step_ms"]:8.1f} ms  {result["img_per_s"]:8.0f} img/s  '
          f'peak {result["peak_mem_gib"]:6.2f} GiB  {result["params_m"]:6.1f} M params', flush=True)
    model.cpu()
    opt = model = None  # free the GPU memory before the next model
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--arm-model', default='arm_mamba_base')
    parser.add_argument('--arm-img-size', type=int, default=192)
    parser.add_argument('--mae-img-size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('pretrain_speed.py needs a CUDA GPU.', file=sys.stderr)
        return 1
    from timm_arm.ops import resolve_backend
    # 'triton' = our kernels (the default), 'cuda' = mamba-ssm / causal-conv1d (TIMM_ARM_BACKEND=cuda)
    backend = resolve_backend(torch.empty(1, device='cuda'), op='scan')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    print(f'{torch.cuda.get_device_name()}  torch {torch.__version__}  scan backend {backend}  '
          f'batch {args.batch_size}')
    arm = bench(f'ARM {args.arm_model}', create_pretrainer(args.arm_model, img_size=args.arm_img_size),
                args.arm_img_size, args)
    mae = bench('MAE ViT-B/16 (75%, 8x512 dec)', MaePretrainer(img_size=args.mae_img_size), args.mae_img_size, args)
    ratio = arm['img_per_s'] / mae['img_per_s']
    mem_ratio = arm['peak_mem_gib'] / mae['peak_mem_gib']
    print(f'ARM / MAE throughput: {ratio:.2f}x   peak memory ARM / MAE: {mem_ratio:.2f}x')
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, backend=backend,
                       arm=arm, mae=mae, throughput_ratio_arm_over_mae=ratio), open(args.json, 'w'), indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
