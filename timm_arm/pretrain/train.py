""" The AR pretraining loop: DDP through torchrun, grad accumulation, AMP, checkpoints, exact resume, logs.

Everything that can be wrong with the inputs (data, image size, batch vs world size, resume file) is checked
on the CPU before any device work or any write to the output folder.
"""
import argparse
import json
import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import IterableDataset, Subset

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from timm_arm.models.arm_pretrain import ArmPretrainer, create_pretrainer

from .checkpoint import (
    CheckpointError,
    atomic_save,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import DataError, WorkerLoader, open_dataset
from .export import export_encoder
from .in_memory import InMemoryError, InMemoryLoader, decode_images

__all__ = ['train', 'export_checkpoint', 'SetupError']

_logger = logging.getLogger('timm_arm.pretrain')

_AMP_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}
_SCHEDULE_ARGS = ('epochs', 'warmup_epochs', 'blr', 'lr', 'min_lr', 'warmup_lr', 'batch_size')


class SetupError(ValueError):
    """Bad arguments, data or resume file: reported before any device work, nothing written."""


def _dist_env() -> Tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's environment."""
    return int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _build_model(model_name: str, img_size: int, model_kwargs: Dict[str, Any]) -> ArmPretrainer:
    try:
        return create_pretrainer(model_name, img_size=img_size, **model_kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise SetupError(f'Cannot build pretrainer {model_name} (img_size={img_size}, {model_kwargs}): {e}') from e


def _check_resume(state: Dict[str, Any], path: str, model: ArmPretrainer, args: argparse.Namespace) -> None:
    """The checkpoint must come from the same architecture and global batch; else a clear error."""
    target, ckpt = model.state_dict(), state['model']
    missing = [k for k in target if k not in ckpt]
    unexpected = [k for k in ckpt if k not in target]
    mismatched = [f'{k} {tuple(ckpt[k].shape)} vs {tuple(v.shape)}' for k, v in target.items()
                  if k in ckpt and ckpt[k].shape != v.shape]
    if missing or unexpected or mismatched:
        what = (f'model {state.get("model_name")} {state.get("model_kwargs")} img_size {state.get("img_size")}')
        details = '; '.join(f'{n} {len(keys)} (e.g. {", ".join(keys[:3])})'
                            for n, keys in (('missing', missing), ('unexpected', unexpected),
                                            ('shape mismatch', mismatched)) if keys)
        raise SetupError(
            f'Resume checkpoint {path} is from another model ({what}); this run builds {args.model} '
            f'{args.model_kwargs} img_size {args.img_size}: {details}. Use another --output or --resume.')
    if state.get('step_in_epoch', 0) and state.get('batch_size') != args.batch_size:
        raise SetupError(
            f'Resume checkpoint {path} stopped mid-epoch with global batch {state.get("batch_size")}; '
            f'--batch-size {args.batch_size} would change the data order. Resume with the same --batch-size.')


def _plain(value: Any) -> Any:
    """argparse values -> weights_only-loadable primitives."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class _Loggers:
    """JSON lines (always) + optional TensorBoard / W&B, on rank 0 only."""

    def __init__(self, args: argparse.Namespace, enabled: bool):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.jsonl = open(os.path.join(args.output, 'log.jsonl'), 'a')
        if args.log_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(args.output, 'tb'))
            except ImportError:
                _logger.warning('--log-tb: tensorboard is not installed, skipping.')
        if args.log_wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=args.wandb_project, config=_plain(vars(args)), dir=args.output,
                                        resume='allow')
            except ImportError:
                _logger.warning('--log-wandb: wandb is not installed, skipping.')

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + '\n')
        self.jsonl.flush()
        step = record['step']
        if self.tb is not None:
            for k, v in record.items():
                if k not in ('step', 'epoch') and isinstance(v, (int, float)):
                    self.tb.add_scalar(f'train/{k}', v, step)
        if self.wandb is not None:
            self.wandb.log({f'train/{k}': v for k, v in record.items() if k != 'step'}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _workers(args: argparse.Namespace) -> int:
    """--workers, at most the CPUs this process may use."""
    return min(args.workers, len(os.sched_getaffinity(0)))


def _open_data(args: argparse.Namespace) -> Tuple[Any, Optional[torch.Tensor]]:
    """The dataset, and all its images as one uint8 tensor when they are held in memory (--in-memory)."""
    name, root, extra = args.dataset, args.data_dir, {}
    if not (name or root) and args.download:
        name, root, extra = args.download, os.path.join(args.cache_dir, args.download.replace('/', '_')), \
            dict(download=True)
        _logger.info(f'No --data-dir: {name} in {root} (downloaded on first use).')
    try:
        dataset = open_dataset(name, root, split=args.train_split, check_images=args.check_images, **extra)
        if args.quick_samples:
            keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
            dataset = Subset(dataset, keep[:args.quick_samples].tolist())
        if args.in_memory == 'off':
            return dataset, None
        if isinstance(dataset, IterableDataset):
            raise InMemoryError(f'--in-memory needs a map-style dataset; {name} is iterable.')
        started = time.perf_counter()
        images = decode_images(dataset, int(args.in_memory_max_gb * 2 ** 30), workers=_workers(args))
    except InMemoryError as e:
        if args.in_memory == 'on':
            raise SetupError(str(e)) from e
        _logger.info(f'Images decoded by worker processes (--in-memory auto): {e}')
        return dataset, None
    except DataError as e:
        raise SetupError(str(e)) from e
    _logger.info(f'{len(images)} images of {images.shape[2]}x{images.shape[1]} px decoded into memory '
                 f'({images.numel() / 2 ** 20:.0f} MiB) in {time.perf_counter() - started:.1f} s; cropped and '
                 f'flipped on the training device.')
    return dataset, images


class _StopOnSignal:
    """SIGINT / SIGTERM ask the loop to checkpoint at the next step boundary and return; a second one aborts."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> '_StopOnSignal':
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f'second {signal.Signals(signum).name}: stopping without a checkpoint')
        self.signum = signum
        _logger.warning(f'{signal.Signals(signum).name} received: writing a checkpoint after this step, then '
                        f'stopping (send it again to abort at once).')

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(args: argparse.Namespace) -> Optional[str]:
    """Run (or resume) pretraining; returns the path of the last checkpoint written by rank 0.

    Stops after all epochs, after --max-steps updates (both export the encoder), or at the step boundary after a
    SIGINT / SIGTERM (checkpoint only; `args.stopped_by_signal` is then set).
    """
    world, rank, local_rank = _dist_env()
    is_main = rank == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)

    # ---- 1. everything that can fail on bad input: CPU only, nothing written ----
    accum = args.grad_accum_steps
    if accum < 1:
        raise SetupError(f'--grad-accum-steps must be >= 1, got {accum}.')
    if args.batch_size < world:
        raise SetupError(f'--batch-size {args.batch_size} (global) is smaller than the world size {world}: '
                         f'every process needs at least one sample per step.')
    if args.batch_size % (world * accum):
        raise SetupError(f'--batch-size {args.batch_size} (global) must be divisible by world size x '
                         f'grad-accum-steps = {world} x {accum}.')
    use_cuda = (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise SetupError(f'--device {args.device}: no CUDA device is available here (use --device cpu).')
    args.quick_samples = 0
    if args.quick_on_cpu and not use_cuda:
        _logger.warning(
            f'No GPU: a quick run of {args.quick_on_cpu} updates (batch 64, {args.quick_on_cpu * 64} images, one '
            f'epoch) instead of {args.epochs} epochs at batch {args.batch_size}; on a GPU this recipe runs in full.'
            + (f' --max-steps {args.max_steps} stops it earlier.' if args.max_steps else ''))
        args.batch_size, args.epochs, args.warmup_epochs = 64, 1, 0.1
        args.grad_accum_steps, args.quick_samples, args.amp_dtype = 1, args.quick_on_cpu * 64, 'float32'
        accum = 1
    micro = args.batch_size // (world * accum)
    amp_dtype = _AMP_DTYPES[args.amp_dtype]

    _seed_all(args.seed)  # same model init on every rank (DDP also broadcasts rank 0's weights)
    model = _build_model(args.model, args.img_size, args.model_kwargs)

    dataset, images = _open_data(args)
    num_images = len(dataset)
    updates_per_epoch = num_images // world // micro // accum
    if updates_per_epoch == 0:
        raise SetupError(f'Dataset of {num_images} images holds less than one global batch ({args.batch_size}).')

    existing = list_checkpoints(args.output) if os.path.isdir(args.output) else []
    if args.no_resume and existing and not args.resume:
        raise SetupError(f'--no-resume, but {args.output} already holds checkpoints ({existing[-1]}): '
                         f'use another --output (nothing is overwritten).')
    resume_path = args.resume or (None if args.no_resume else latest_checkpoint(args.output))
    state = None
    if resume_path:
        if not os.path.isfile(resume_path):
            raise SetupError(f'--resume {resume_path}: no such file.')
        try:
            state = load_checkpoint(resume_path)
        except CheckpointError as e:
            raise SetupError(str(e)) from e
        _check_resume(state, resume_path, model, args)

    # ---- 2. devices, process group, output ----
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if use_cuda else 'gloo', device_id=device if use_cuda else None)
    if is_main:
        os.makedirs(args.output, exist_ok=True)
        atomic_save(_plain(vars(args)), os.path.join(args.output, 'args.yaml'),
                    save_fn=lambda obj, f: f.write(yaml.safe_dump(obj, sort_keys=False).encode()))

    model.to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    optimizer = create_optimizer_v2(model, opt='adamw', lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, step_in_epoch, global_step = 0, 0, 0
    torch.manual_seed(args.seed + rank)  # per-rank stochastic depth etc.
    if state is not None:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        old = state.get('args', {})
        if all(old.get(k) == getattr(args, k) for k in _SCHEDULE_ARGS):
            scheduler.load_state_dict(state['scheduler'])
        else:
            _logger.warning('Schedule arguments changed since the checkpoint: following the new schedule.')
        if state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        start_epoch, step_in_epoch, global_step = state['epoch'], state['step_in_epoch'], state['global_step']
        if rank == 0:
            set_rng_state(state['rng'])
        else:
            torch.manual_seed(args.seed + rank + 1_000_003 * global_step)
        _logger.info(f'Resumed from {resume_path}: epoch {start_epoch}, step {global_step}.')
        del state

    ddp_model = model
    if world > 1:
        ddp_model = DistributedDataParallel(
            model, device_ids=[local_rank] if use_cuda else None,
            find_unused_parameters=max(model.tap_layers) < len(model.encoder.blocks))

    if images is not None:
        loader = InMemoryLoader(images.to(device), micro, args.img_size, num_replicas=world, rank=rank,
                                seed=args.seed, scale=tuple(args.scale))
    else:
        loader = WorkerLoader(dataset, micro, args.img_size, num_replicas=world, rank=rank, seed=args.seed,
                              scale=tuple(args.scale), workers=_workers(args), pin_memory=args.pin_mem and use_cuda)
    total_updates = args.epochs * updates_per_epoch
    if args.max_steps:
        total_updates = min(total_updates, args.max_steps)
    _logger.info(
        f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, '
        f'{num_images} images, world {world} x micro-batch {micro} x accum {accum} = global batch '
        f'{args.batch_size}, lr {lr:.3g}, {updates_per_epoch} updates/epoch, {total_updates} updates in all, '
        f'amp {args.amp_dtype}, device {device}.')

    loggers = _Loggers(args, is_main)
    params = [p for p in model.parameters() if p.requires_grad]
    last_ckpt = None
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    t_log, steps_since_log = time.perf_counter(), 0
    t_start, steps_done = t_log, 0
    t_ckpt = t_log
    record: Dict[str, Any] = {}
    stop = global_step >= total_updates
    args.stopped_by_signal = None

    def checkpoint(epoch_now: int, step_now: int) -> Optional[str]:
        if not is_main:
            return None
        state_now = dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), epoch=epoch_now, step_in_epoch=step_now, global_step=global_step,
            rng=rng_state(), model_name=args.model, model_kwargs=_plain(args.model_kwargs),
            img_size=args.img_size, batch_size=args.batch_size, dataset_len=num_images, args=_plain(vars(args)))
        return save_checkpoint(state_now, args.output, global_step, keep_last=args.keep_last)

    def signalled(signals: _StopOnSignal) -> bool:
        """Whether a stop was asked for, on any rank (checked on every rank at the same steps)."""
        if world == 1:
            return signals.signum is not None
        if global_step % 10:
            return False
        flag = torch.tensor([float(signals.signum is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    with _StopOnSignal() as signals:
        for epoch in range(start_epoch, args.epochs):
            if stop:
                break
            loader.set_epoch(epoch, start=step_in_epoch * accum * micro)
            batches = iter(loader)
            pbar = None
            if is_main and not args.no_progress:
                from tqdm import tqdm
                pbar = tqdm(total=updates_per_epoch, initial=step_in_epoch, desc=f'epoch {epoch}',
                            dynamic_ncols=True, unit='step')
            ddp_model.train()
            for update in range(step_in_epoch, updates_per_epoch):
                if signalled(signals):
                    args.stopped_by_signal = signal.Signals(signals.signum or signal.SIGTERM).name
                    last_ckpt = checkpoint(epoch, update) or last_ckpt
                    stop = True
                    break
                scheduler.step_update(num_updates=global_step)
                loss_sum = torch.zeros((), device=device)
                for micro_step in range(accum):
                    images_now = next(batches).to(device, non_blocking=True)
                    sync = micro_step == accum - 1 or ddp_model is model
                    with nullcontext() if sync else ddp_model.no_sync():
                        with autocast:
                            loss = ddp_model(images_now)
                        scaler.scale(loss / accum).backward()
                    loss_sum += loss.detach()
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                steps_since_log += 1
                steps_done += 1
                end_of_epoch = update + 1 == updates_per_epoch
                stop = global_step >= total_updates

                if global_step % args.log_interval == 0 or steps_done == 1 or end_of_epoch or stop:
                    loss_avg = loss_sum / accum
                    if world > 1:
                        dist.all_reduce(loss_avg, op=dist.ReduceOp.AVG if use_cuda else dist.ReduceOp.SUM)
                        if not use_cuda:
                            loss_avg /= world
                    loss_value = loss_avg.item()
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f'Loss is {loss_value} at step {global_step}; stopping.')
                    now = time.perf_counter()
                    img_per_s = steps_since_log * args.batch_size / max(now - t_log, 1e-9)
                    eta = (now - t_start) / steps_done * (total_updates - global_step)
                    record = dict(step=global_step, epoch=epoch, loss=loss_value,
                                  lr=optimizer.param_groups[0]['lr'], img_per_s=img_per_s, eta_s=eta,
                                  time=time.time())
                    if args.clip_grad:
                        record['grad_norm'] = float(grad_norm)
                    loggers.log(record)
                    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 86400 else f'{eta / 86400:.1f}d'
                    if is_main and pbar is None:  # no progress bar (--no-progress): a log line per logged step
                        _logger.info(f'update {global_step}/{total_updates} (epoch {epoch}): loss {loss_value:.4f}, '
                                     f'lr {record["lr"]:.2e}, {img_per_s:.0f} img/s, eta {eta_text}')
                    if pbar is not None:
                        pbar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{record["lr"]:.2e}', img_s=f'{img_per_s:.0f}')
                    t_log, steps_since_log = now, 0
                if pbar is not None:
                    pbar.update(1)

                due = (global_step % args.ckpt_interval == 0
                       or (args.ckpt_minutes and time.perf_counter() - t_ckpt >= 60 * args.ckpt_minutes))
                if end_of_epoch:
                    last_ckpt = checkpoint(epoch + 1, 0) or last_ckpt
                elif due or stop:
                    last_ckpt = checkpoint(epoch, update + 1) or last_ckpt
                if end_of_epoch or due or stop:
                    t_ckpt = time.perf_counter()
                if stop:
                    break
            step_in_epoch = 0
            if pbar is not None:
                pbar.close()

    loggers.close()
    export = None
    if is_main and not args.stopped_by_signal and not args.no_export:
        export = os.path.join(args.output, 'export')
        export_encoder(model, export, args.model)
    if is_main:
        _summary(args, model, record, global_step, args.epochs * updates_per_epoch, time.perf_counter() - t_start,
                 steps_done,
                 last_ckpt or latest_checkpoint(args.output), export)
    if world > 1:
        dist.barrier()
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return last_ckpt


def _summary(args: argparse.Namespace, model: ArmPretrainer, record: Dict[str, Any], step: int, all_updates: int,
             seconds: float, steps_done: int, checkpoint: Optional[str], export: Optional[str]) -> None:
    """The closing lines: where the run stands, what it wrote, and what to run next."""
    if args.stopped_by_signal:
        how = f'stopped by {args.stopped_by_signal} at update {step} of {all_updates}'
    elif step < all_updates:
        how = f'stopped by --max-steps at update {step} of {all_updates}'
    else:
        how = f'finished ({step} updates, {args.epochs} epochs)'
    if steps_done:  # the loss of the last logged update (every --log-interval, the first and the last)
        at = '' if record['step'] == step else f' at update {record["step"]}'
        stand = f'loss {record["loss"]:.4f}{at}, {steps_done * args.batch_size / seconds:.0f} img/s over this run'
    else:
        stand = 'nothing left to run'
    lines = [f'Pretraining {how}: {stand}.']
    if checkpoint:
        lines.append(f'  checkpoint: {checkpoint}  (the same command resumes from it)')
    if export:
        grid = model.encoder.patch_embed.grid_size
        lines += [
            f'  export:     {export}/model.safetensors + config.json ({args.model}, {args.img_size} px, '
            f'{grid[0]}x{grid[1]} grid of patches)',
            '  fine-tune:  timm.create_model(\'local-dir:' + export + '\', pretrained=True, num_classes=N)',
            f'              python train.py --device-modules timm_arm --model local-dir:{export} --pretrained '
            f'--num-classes N --data-dir DATA',
        ]
    elif args.stopped_by_signal:
        lines.append('  export:     none yet (written when the run completes; or: timm-arm-pretrain --output '
                     f'{args.output} --export DIR)')
    _logger.info('\n'.join(lines))


def _load_trained(args: argparse.Namespace) -> Tuple[str, Dict[str, Any], ArmPretrainer]:
    """The checkpoint given by --resume (or the latest in --output), its state, and the model with its weights."""
    path = args.resume or latest_checkpoint(args.output)
    if not path:
        raise SetupError(f'no checkpoint given (--resume) or found in {args.output}.')
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise SetupError(str(e)) from e
    model = _build_model(state['model_name'], state['img_size'], state['model_kwargs'])
    model.load_state_dict(state['model'])
    return path, state, model


def export_checkpoint(args: argparse.Namespace) -> str:
    """--export DIR: the encoder of --resume FILE (or the latest checkpoint in --output) -> DIR."""
    path, state, model = _load_trained(args)
    weights = export_encoder(model, args.export, state['model_name'])
    _logger.info(f'Exported the encoder of {path} to {weights}.')
    return weights


def visualize_checkpoint(args: argparse.Namespace) -> str:
    """--visualize FILE.png: images of --data-dir beside the next-cluster predictions of the checkpoint's model."""
    from .visualize import visualize
    if args.num_images < 1:
        raise SetupError(f'--num-images must be >= 1, got {args.num_images}.')
    try:
        dataset = open_dataset(args.dataset, args.data_dir, split=args.train_split, check_images=args.check_images)
    except DataError as e:
        raise SetupError(str(e)) from e
    path, _, model = _load_trained(args)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    out = visualize(model, dataset, args.visualize, num_images=args.num_images, device=device)
    _logger.info(f'Wrote {out}: {min(args.num_images, len(dataset))} images of {args.data_dir} (left) and the '
                 f'next-cluster predictions of {path} (right).')
    return out
