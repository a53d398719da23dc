""" Run one of timm's scripts (train.py, validate.py, benchmark.py, inference.py, ...) with the ARM models registered.

validate.py, benchmark.py and inference.py have no --device-modules option, so they cannot import timm_arm
themselves. This launcher imports it, then runs the script as ``__main__``, as ``python SCRIPT ARGS`` would:

    timm-arm-run validate.py --model arm_mamba_base.arm_in1k --pretrained --data-dir /imagenet --amp
    python -m timm_arm.run benchmark.py --model arm_mamba_base --amp --amp-dtype bfloat16
    timm-arm-run -m some.module ARGS        # a module instead of a file

For train.py with --config/-c, the recipe is checked first against that very train.py's arguments
(timm_arm.recipes.check_recipe); --no-check before the script name skips this.

A bare script name (`validate.py`) that is not a file here is looked up in the folder named by the TIMM_SCRIPTS
environment variable (a checkout of github.com/huggingface/pytorch-image-models). timm's scripts default to
`--device cuda`: without a GPU, and unless the command line or the recipe names a device, `--device cpu` is added.
"""
import os
import runpy
import sys
from typing import List, Optional

__all__ = ['main']

USAGE = 'usage: timm-arm-run [--no-check] SCRIPT.py [ARGS...]  |  timm-arm-run [--no-check] -m MODULE [ARGS...]'
_DEVICE_SCRIPTS = ('train.py', 'validate.py', 'inference.py', 'benchmark.py')  # timm's, all `--device cuda`


def _option(argv: List[str], *names: str) -> Optional[str]:
    """Value of the last ``--name value`` / ``--name=value`` in argv (argparse's last-wins rule)."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + '='):
                value = arg[len(name) + 1:]
    return value


def _check_train_config(script: str, argv: List[str]) -> None:
    """Reject a train.py recipe that train.py would misread, before any data or model is set up."""
    from timm_arm.recipes import RecipeError, load_recipe, load_train_args

    config = _option(argv, '--config', '-c')
    if not config:
        return
    recipe = load_recipe(config, load_train_args(script))  # raises RecipeError listing every problem
    pretrained = recipe.get('pretrained') or '--pretrained' in argv
    if pretrained and not _option(argv, '--pretrained-path') and recipe.get('model'):
        from timm.models import get_pretrained_cfg

        from timm_arm.models._weights import hub_weights_problem

        name = recipe['model']
        cfg = get_pretrained_cfg(name, allow_unregistered=True)
        if cfg is None or not (cfg.url or cfg.file or cfg.hf_hub_id):
            raise RecipeError(
                f'{config}: pretrained is set but {name} has no published weights: pass --pretrained-path '
                f'(train.py would silently start from random weights)')
        problem = cfg.hf_hub_id and hub_weights_problem(cfg.hf_hub_id)  # in the local cache or fetchable?
        if problem:
            raise RecipeError(
                f'{config}: pretrained is set, but the weights of {name} ({cfg.hf_hub_id}) cannot be had: {problem}. '
                f"Pass --pretrained-path FILE to start from a file (e.g. timm-arm-pretrain's "
                f'OUT/export/model.safetensors)')


def _find_script(script: str) -> str:
    if os.path.isfile(script):
        return script
    folder = os.environ.get('TIMM_SCRIPTS', '')
    if folder and os.sep not in script and os.path.isfile(os.path.join(folder, script)):
        return os.path.join(folder, script)
    where = f'here or in TIMM_SCRIPTS={folder}' if folder else (
        'here; set TIMM_SCRIPTS to a checkout of github.com/huggingface/pytorch-image-models to run it by name')
    raise SystemExit(f'timm-arm-run: no such script: {script} ({where})\n{USAGE}')


def _default_device(args: List[str]) -> List[str]:
    """`--device cpu` appended when no GPU is present and neither the command line nor its recipe picks one."""
    import torch
    if torch.cuda.is_available() or _option(args, '--device') is not None:
        return args
    config = _option(args, '--config', '-c')
    if config and os.path.isfile(config):
        import yaml
        try:
            with open(config) as f:
                if 'device' in (yaml.safe_load(f) or {}):
                    return args
        except yaml.YAMLError:
            pass  # the recipe check reports it
    print('timm-arm-run: no GPU here: adding --device cpu', file=sys.stderr)
    return [*args, '--device', 'cpu']


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    check = True
    if argv and argv[0] == '--no-check':
        check, argv = False, argv[1:]
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE + '\n\n' + __doc__.strip())
        raise SystemExit(0 if argv else 2)

    import timm_arm  # noqa: F401  registers the ARM models with timm

    if argv[0] == '-m':
        if len(argv) < 2:
            raise SystemExit(USAGE)
        module, args = argv[1], argv[2:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name='__main__', alter_sys=True)
        return

    script, args = _find_script(argv[0]), argv[1:]
    if os.path.basename(script) in _DEVICE_SCRIPTS:
        args = _default_device(args)
    if check and os.path.basename(script) == 'train.py':
        from timm_arm.recipes import RecipeError
        try:
            _check_train_config(script, args)
        except RecipeError as e:
            raise SystemExit(f'timm-arm-run: recipe rejected (--no-check to run anyway): {e}')
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` does
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
