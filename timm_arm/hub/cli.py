""" timm-arm-hub: convert / verify / publish (also `python -m timm_arm.hub`). """
import argparse
import logging
import sys
from typing import List, Optional

from timm.utils import ParseKwargs

from .source import HubError

__all__ = ['main', 'build_parser']

PROG = 'timm-arm-hub'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description='ARM pretrained weights: convert checkpoints to Hub folders, verify, publish.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('convert', help='checkpoint (reference code or timm-arm) -> Hub-ready safetensors folder')
    p.add_argument('source', help='.pth / .safetensors checkpoint, or a folder with model.safetensors')
    p.add_argument('out_dir', help='folder to create (model.safetensors, config.json, README.md)')
    p.add_argument('--model', default=None, metavar='NAME',
                   help='arm_mamba_<size>[.<tag>]; without a tag: the tag that fits the checkpoint (form, size); '
                        'default: the model of the train.py or timm-arm-pretrain run whose args.yaml lies beside '
                        'the checkpoint')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help='extra create_model arguments, e.g. embed_dim=32 depth=2')
    entry = p.add_mutually_exclusive_group()
    entry.add_argument('--entry', default=None, help="checkpoint entry to convert (default: 'model' / 'state_dict')")
    entry.add_argument('--ema', action='store_const', dest='entry', const='ema',
                       help="convert the EMA weights ('model_ema', or timm train.py's 'state_dict_ema')")
    p.add_argument('--repo-id', default=None, help='Hub repo named in the model card (default: the tag\'s)')
    p.add_argument('--overwrite', action='store_true', help='replace OUT_DIR if it exists')
    p.add_argument('--no-verify', dest='verify', action='store_false',
                   help='skip checking the folder against the source before moving it into place')
    p.add_argument('--dataset', default=None, help='training dataset named in the model card (default: from the tag)')
    p.add_argument('--metrics', nargs='*', default={}, action=ParseKwargs, metavar='NAME=VALUE',
                   help='measured results of these weights for the model card, e.g. top1=96.1 top5=99.9')
    p.add_argument('--recipe', action='append', default=[], metavar='FILE',
                   help='recipe shown in the model card (repeatable)')

    p = sub.add_parser('cache', help='place a folder in the local Hugging Face cache as a download would')
    p.add_argument('out_dir')
    p.add_argument('--repo-id', default=None, help="Hub repo it stands for (default: the tag's, from the folder name)")
    p.add_argument('--cache-dir', default=None, help='Hugging Face hub cache (default: HF_HUB_CACHE)')

    p = sub.add_parser('verify', help='reload a folder through timm (local-dir:) and compare with the source')
    p.add_argument('out_dir')
    p.add_argument('--source', default=None, help='checkpoint the folder was converted from (default: the '
                                                  "folder's own weights, which checks only timm's loading path)")
    p.add_argument('--entry', default=None)
    p.add_argument('--tolerance', type=float, default=1e-5, help='max relative difference (default 1e-5)')

    p = sub.add_parser('publish', help='upload a folder to the Hub (only new or changed files)')
    p.add_argument('out_dir')
    p.add_argument('repo_id', help='<owner>/<name>')
    p.add_argument('--revision', default=None, help='branch (default: main)')
    p.add_argument('--private', action='store_true', help='create the repo as private')
    p.add_argument('--commit-message', default=None)
    p.add_argument('--dry-run', action='store_true', help='show what would be uploaded; upload nothing')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    try:
        if args.command == 'convert':
            from .export import convert
            convert(args.source, args.out_dir, args.model, args.model_kwargs, entry=args.entry,
                    overwrite=args.overwrite, repo_id=args.repo_id, check=args.verify, dataset=args.dataset,
                    metrics={k: float(v) for k, v in args.metrics.items()}, recipes=args.recipe)
        elif args.command == 'cache':
            from .upload import place_in_cache
            place_in_cache(args.out_dir, repo_id=args.repo_id, cache_dir=args.cache_dir)
        elif args.command == 'verify':
            from .export import verify
            verify(args.out_dir, args.source, entry=args.entry, tolerance=args.tolerance)
        else:
            from .upload import publish
            publish(args.out_dir, args.repo_id, revision=args.revision, private=args.private,
                    commit_message=args.commit_message, dry_run=args.dry_run)
    except HubError as e:
        print(f'{PROG}: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
