""" timm-arm-pretrain: ARM autoregressive pretraining (also `python -m timm_arm.pretrain`).

Single process:   timm-arm-pretrain --config recipes/pretrain/arm_mamba_tiny_cifar10.yaml --data-dir DIR --output OUT
Multi-GPU / node: torchrun --nproc-per-node 8 [--nnodes N --rdzv-endpoint HOST:PORT] -m timm_arm.pretrain ...
Export encoder:   timm-arm-pretrain --output OUT --export OUT/export   (latest checkpoint in OUT, or --resume FILE)
Predictions:      timm-arm-pretrain --output OUT --visualize grid.png --data-dir DIR   (images beside their
                  next-cluster predictions)

--batch-size is the GLOBAL batch per optimizer update; each of the world_size processes runs micro-batches of
batch_size / (world_size x grad_accum_steps). lr = blr x batch_size / 256 for any world size.
Every flag can be set in a YAML file (--config), with underscores: `batch_size: 2048`; the command line wins.
"""
import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

import yaml

from timm.utils import ParseKwargs

__all__ = ['main', 'build_parser', 'parse_args']

_logger = logging.getLogger('timm_arm.pretrain')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        'timm-arm-pretrain', description='ARM autoregressive pretraining of an ArmMamba encoder.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group('Data')
    g.add_argument('--data-dir', default='', help='image folder (class sub-folders or not), .tar, or dataset root')
    g.add_argument('--dataset', default='', help='timm dataset name ("" = folder / tar; e.g. hfds/..., wds/...)')
    g.add_argument('--download', default='', metavar='NAME',
                   help='without --data-dir and --dataset: this timm dataset (e.g. torch/cifar10), downloaded once '
                        'into --cache-dir')
    g.add_argument('--cache-dir', default=os.path.join(os.path.expanduser('~'), '.cache', 'timm-arm', 'data'),
                   help='where --download keeps its data')
    g.add_argument('--train-split', default='train', help='dataset split (a folder of that name is used if present)')
    g.add_argument('--workers', '-j', type=int, default=8, help='data loading processes per GPU')
    g.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=True)
    g.add_argument('--check-images', type=int, default=8, help='decode this many images before starting')
    g.add_argument('--in-memory', default='auto', choices=('auto', 'on', 'off'),
                   help='decode all images once and crop / flip them on the training device (auto: when they are '
                        'of one size and fit --in-memory-max-gb); off: worker processes decode every sample')
    g.add_argument('--in-memory-max-gb', type=float, default=8.,
                   help='largest dataset (uint8 pixels, per process) held in memory')
    g.add_argument('--scale', type=float, nargs=2, default=(0.2, 1.0), metavar=('MIN', 'MAX'),
                   help='RandomResizedCrop area range')

    g = parser.add_argument_group('Model')
    g.add_argument('--model', default='arm_mamba_base', help='registered ArmMamba variant')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='k=v: cluster_size, tap_layers, decoder_embed_dim, decoder_depth, embed_dim, depth, ...')
    g.add_argument('--img-size', type=int, default=192)
    g.add_argument('--grad-checkpointing', action='store_true')

    g = parser.add_argument_group('Optimisation')
    g.add_argument('-b', '--batch-size', type=int, default=2048, help='global batch per optimizer update')
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--epochs', type=int, default=1600)
    g.add_argument('--warmup-epochs', type=float, default=40)
    g.add_argument('--blr', type=float, default=1.5e-4, help='base lr: lr = blr x batch_size / 256')
    g.add_argument('--lr', type=float, default=None, help='absolute lr (overrides --blr)')
    g.add_argument('--min-lr', type=float, default=0.)
    g.add_argument('--warmup-lr', type=float, default=0.)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--clip-grad', type=float, default=3.0, help='max grad norm (0 / None: off)')
    g.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16', 'float32'))
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--max-steps', type=int, default=0, help='stop after this many updates (checkpoint + export)')
    g.add_argument('--quick-on-cpu', type=int, default=0, metavar='N',
                   help='without a GPU, run a short version instead: N updates of batch 64 over N x 64 images (one '
                        'epoch, cosine with 10%% warm-up), to see the whole job on a laptop (0: off)')

    g = parser.add_argument_group('Output')
    g.add_argument('--output', default='output/pretrain', help='folder for checkpoints, logs, export')
    g.add_argument('--resume', default='', help='checkpoint file; default: the latest one in --output')
    g.add_argument('--no-resume', action='store_true', help='start fresh (refused if --output has checkpoints)')
    g.add_argument('--ckpt-interval', type=int, default=1000, help='checkpoint every N updates (and each epoch)')
    g.add_argument('--ckpt-minutes', type=float, default=10.,
                   help='also checkpoint when this many minutes passed since the last one (0: off)')
    g.add_argument('--keep-last', type=int, default=3, help='checkpoints to keep')
    g.add_argument('--log-interval', type=int, default=20, help='updates between log lines')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    g.add_argument('--log-tb', action='store_true', help='TensorBoard events in --output/tb (if installed)')
    g.add_argument('--log-wandb', action='store_true', help='log to Weights & Biases (if installed)')
    g.add_argument('--wandb-project', default='timm-arm-pretrain')
    g.add_argument('--export', default='', metavar='DIR',
                   help='only export the encoder of the checkpoint (--resume or latest in --output) to DIR')
    g.add_argument('--no-export', action='store_true', help='do not export the encoder at the end of training')
    g.add_argument('--visualize', default='', metavar='FILE.png',
                   help='only draw images of --data-dir beside the next-cluster predictions of the checkpoint '
                        '(--resume or latest in --output) into FILE.png')
    g.add_argument('--num-images', type=int, default=8, help='images in the --visualize grid')
    g.add_argument('--device', default='', help="cuda / cpu; %(default)r: cuda if available")
    return parser


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict:
    """The YAML file's values, each checked as the command line would check it; parser.error() otherwise."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        parser.error(f'config {path}: {e.strerror or e}')
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark else ''
        parser.error(f'config {path} is not valid YAML{where}: {getattr(e, "problem", None) or e}')
    if not isinstance(cfg, dict):
        parser.error(f'config {path} must map flag names to values, not hold a {type(cfg).__name__}')
    actions = {a.dest: a for a in parser._actions}
    cfg = {str(k).replace('-', '_'): v for k, v in cfg.items()}
    unknown = sorted(k for k in cfg if k not in actions)
    if unknown:
        parser.error(f'unknown keys in {path}: {", ".join(unknown)}')
    for key, value in cfg.items():
        action = actions[key]
        values = value if isinstance(value, list) and action.nargs not in (None, '?') else [value]
        for v in values:
            if action.choices is not None and v not in action.choices:
                parser.error(f'config {path}: {key}: invalid choice {v!r} (choose from '
                             f'{", ".join(map(repr, action.choices))})')
            if action.type is int and (isinstance(v, bool) or not isinstance(v, int)):
                parser.error(f'config {path}: {key} must be an integer, got {v!r}')
            if action.type is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                parser.error(f'config {path}: {key} must be a number, got {v!r}')
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and \
                    not isinstance(v, bool):
                parser.error(f'config {path}: {key} must be true or false, got {v!r}')
    return cfg


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', metavar='FILE.yaml')
    known, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    parser.add_argument('-c', '--config', default='', metavar='FILE.yaml',
                        help='YAML file of flag defaults, or the name of a packaged recipe (recipes/pretrain/)')
    if known.config:
        from timm_arm.recipes import find_recipe
        known.config = str(find_recipe(known.config, 'pretrain'))
        parser.set_defaults(**_read_config(parser, known.config))
    args = parser.parse_args(remaining)
    args.config = known.config
    return args


def main(argv: Optional[List[str]] = None) -> int:
    from .train import SetupError, export_checkpoint, train, visualize_checkpoint
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    try:
        if args.export:
            export_checkpoint(args)
        elif args.visualize:
            visualize_checkpoint(args)
        else:
            train(args)
            if args.stopped_by_signal:  # checkpoint written; the shell convention for a signalled process
                return 128 + signal.Signals[args.stopped_by_signal].value
    except SetupError as e:
        print(f'timm-arm-pretrain: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
