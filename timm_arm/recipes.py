""" Recipes for timm's train.py: its argument list, and a loader that rejects recipes train.py would misread.

timm's train.py reads ``--config FILE.yaml`` with ``parser.set_defaults(**yaml)``: keys are argparse *dest* names
(``layer_decay``, not ``layer-decay``), and argparse neither checks nor converts them. A misspelt key is silently
ignored, a hyphenated one too, and ``epochs: 100.0`` breaks only at ``range()``. ``load_recipe`` catches those
before a multi-day run starts, plus a few combinations that train.py accepts but that do not do what the recipe
means (see ``check_recipe``).

train.py is not in timm's wheel, so its argument list is recorded in timm_arm/train_py_args.json, with
the timm version and git ref it was taken from. Regenerate it from a timm checkout with:

    python -m timm_arm.recipes extract /path/to/pytorch-image-models/train.py --ref <git sha or tag> \
        -o timm_arm/train_py_args.json
    python -m timm_arm.recipes check recipes/finetune/*.yaml
"""
import argparse
import ast
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

__all__ = [
    'RecipeError', 'extract_train_args', 'write_train_args', 'load_train_args', 'train_args_defaults',
    'load_recipe', 'check_recipe', 'find_recipe', 'DEFAULT_TRAIN_ARGS', 'RECIPES',
]

DEFAULT_TRAIN_ARGS = Path(__file__).resolve().parent / 'train_py_args.json'
RECIPES = Path(__file__).resolve().parent / 'recipe_files'  # also at recipes/ in the repository


def _packaged(kind: str) -> List[str]:
    return sorted(p.stem for p in (RECIPES / kind).glob('*.yaml'))


def find_recipe(name: Union[str, Path], kind: str) -> Path:
    """A recipe file: `name` itself if it exists, else the packaged recipe of that name (with or without .yaml) in
    recipes/<kind>/ ('pretrain' or 'finetune'), so that installed wheels find them too."""
    path = Path(name)
    if path.exists():
        return path
    packaged = RECIPES / kind / (path.name if path.suffix in ('.yaml', '.yml') else f'{path.name}.yaml')
    return packaged if packaged.is_file() else path

# Keyword arguments train.py passes to create_model() itself: the same key in model_kwargs is a TypeError
# ("got multiple values for keyword argument") at model creation, after data and workers are up.
_CREATE_MODEL_KWARGS = (
    'pretrained', 'in_chans', 'num_classes', 'drop_rate', 'drop_path_rate', 'drop_block_rate', 'global_pool',
    'bn_momentum', 'bn_eps', 'scriptable', 'checkpoint_path', 'pretrained_cfg_overlay',
)

_TYPES = {'int': (int,), 'float': (int, float), 'str': (str,)}


class RecipeError(ValueError):
    """A recipe that train.py would reject, ignore in part, or run other than it reads."""


_ARITHMETIC = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.List, ast.Tuple, ast.operator,
               ast.unaryop, ast.Load)


def _literal(node: ast.AST) -> Any:
    """A constant (also constant arithmetic such as ``3. / 4.``); anything else (names, calls) as its source."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        pass
    expr = ast.Expression(node)
    if all(isinstance(n, _ARITHMETIC) for n in ast.walk(expr)):
        return eval(compile(expr, '<train.py>', 'eval'), {'__builtins__': {}})  # constants and operators only
    return ast.unparse(node)


def extract_train_args(source: str) -> List[Dict[str, Any]]:
    """Every ``add_argument`` call of a train.py source, as dicts of dest, option strings, type, nargs, action,
    choices and default. The source is parsed, never executed."""
    args = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == 'add_argument'):
            continue
        options = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if 'dest' in kw:
            dest = _literal(kw['dest'])
        else:
            longs = [o for o in options if o.startswith('--')]
            dest = (longs[0] if longs else options[0]).lstrip('-').replace('-', '_')
        entry = {'dest': dest, 'options': options}
        for key in ('type', 'nargs', 'action', 'choices', 'default', 'const'):
            if key in kw:
                value = kw[key]
                entry[key] = value.id if key == 'type' and isinstance(value, ast.Name) else _literal(value)
        args.append(entry)
    return json.loads(json.dumps(sorted(args, key=lambda a: a['dest'])))  # tuples -> lists, as in the JSON record


def _version_of(train_py: Path) -> Optional[str]:
    version_file = train_py.parent / 'timm' / 'version.py'
    if version_file.exists():
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
        return match.group(1) if match else None
    return None


def write_train_args(
        train_py: Union[str, Path],
        out: Union[str, Path] = DEFAULT_TRAIN_ARGS,
        source_ref: str = '',
        timm_version: Optional[str] = None,
) -> Dict[str, Any]:
    """Record train.py's arguments as JSON: {timm_version, source_ref, args: [...]}."""
    train_py = Path(train_py)
    record = {
        'timm_version': timm_version or _version_of(train_py) or 'unknown',
        'source_ref': source_ref,
        'source': 'https://github.com/huggingface/pytorch-image-models/blob/main/train.py',
        'args': extract_train_args(train_py.read_text()),
    }
    head = json.dumps({k: v for k, v in record.items() if k != 'args'}, indent=1)[:-2]
    rows = ',\n  '.join(json.dumps(a) for a in record['args'])  # one argument per line: readable diffs
    Path(out).write_text(f'{head},\n "args": [\n  {rows}\n ]\n}}\n')
    return record


def load_train_args(path: Union[str, Path, None] = None) -> Dict[str, Dict[str, Any]]:
    """dest -> argument record, from a train_py_args.json or directly from a train.py."""
    path = Path(path or DEFAULT_TRAIN_ARGS)
    if path.suffix == '.py':
        return {a['dest']: a for a in extract_train_args(path.read_text())}
    return {a['dest']: a for a in json.loads(path.read_text())['args']}


def train_args_defaults(train_args: Optional[Mapping[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """train.py's defaults as a dict (dest -> default), what ``args`` holds before a recipe is applied."""
    train_args = train_args or load_train_args()
    out = {}
    for dest, a in train_args.items():
        if 'default' in a:
            out[dest] = a['default']
        elif a.get('action') == 'store_true':
            out[dest] = False
        elif a.get('action') == 'store_false':
            out[dest] = True
        else:
            out[dest] = None
    out['model_kwargs'] = dict(out.get('model_kwargs') or {})
    out['opt_kwargs'] = dict(out.get('opt_kwargs') or {})
    return out


def _check_type(key: str, value: Any, a: Dict[str, Any]) -> Optional[str]:
    action, nargs, type_name = a.get('action'), a.get('nargs'), a.get('type')
    if value is None:
        return None
    if action in ('store_true', 'store_false'):
        return None if isinstance(value, bool) else f'{key}: expected true/false, got {value!r}'
    if isinstance(action, str) and action.endswith('ParseKwargs'):
        return None if isinstance(value, dict) else f'{key}: expected a mapping (key: value), got {value!r}'
    values = [value]
    if nargs in ('+', '*') or isinstance(nargs, int):
        if not isinstance(value, (list, tuple)):
            return f'{key}: expected a list (nargs={nargs!r}), got {value!r}'
        if isinstance(nargs, int) and len(value) != nargs:
            return f'{key}: expected {nargs} values, got {len(value)}'
        values = list(value)
    elif nargs == '?' and isinstance(value, (list, tuple)):
        return f'{key}: expected one value, got a list'
    allowed = _TYPES.get(type_name, (str,) if type_name is None and action is None else None)
    for v in values:
        if allowed and (not isinstance(v, allowed) or isinstance(v, bool)):
            return f'{key}: expected {type_name or "str"}, got {v!r} ({type(v).__name__})'
        if a.get('choices') and isinstance(a['choices'], (list, tuple)) and v not in a['choices']:
            return f'{key}: {v!r} is not one of {a["choices"]}'
    return None


def check_recipe(
        recipe: Mapping[str, Any],
        train_args: Optional[Mapping[str, Dict[str, Any]]] = None,
        check_model: bool = False,
) -> List[str]:
    """Problems of a recipe (a dict as read from YAML), as messages; empty if none.

    Checks: every key is a train.py dest name (hyphenated or misspelt keys are silently ignored by train.py)
    with a value of the type argparse would have produced; and these combinations:
      * lr and lr_base both set (lr silently wins); lr_base with an Ada*/Lamb optimizer and no lr_base_scale
        (train.py would scale by sqrt(batch / 256), the paper scales linearly);
      * amp_dtype / model_ema_* / layer_decay_* / mixup_* / cutmix_minmax set while the feature they tune is off;
      * mixup or cutmix with jsd_loss, or with a mixup_off_epoch past the last epoch;
      * model_kwargs repeating an argument train.py already passes to create_model (TypeError at start-up);
      * img_size / input_size disagreeing with model_kwargs img_size (fixed-size models fail on the first batch);
      * an ARM model without timm_arm in device_modules (model name unknown to timm);
      * with ``check_model``: layer_decay on a model without group_matcher() (builds the model on the meta device).
    """
    train_args = train_args if train_args is not None else load_train_args()
    errors = []
    for key, value in recipe.items():
        if key in train_args:
            msg = _check_type(key, value, train_args[key])
            if msg:
                errors.append(msg)
            continue
        hint = ''
        if key.replace('-', '_') in train_args:
            hint = f' (train.py reads dest names: use {key.replace("-", "_")!r})'
        else:
            close = difflib.get_close_matches(key, list(train_args), n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
        errors.append(f'unknown key {key!r}{hint}')
    if 'config' in recipe:
        errors.append('config: a recipe cannot name another config file')

    r = {**train_args_defaults(train_args), **recipe}
    if recipe.get('lr') is not None and 'lr_base' in recipe:
        errors.append('lr and lr_base both set: train.py uses lr and ignores lr_base; keep one')
    if 'lr_base' in recipe and recipe.get('lr') is None and not recipe.get('lr_base_scale'):
        if any(o in str(r.get('opt', '')).lower() for o in ('ada', 'lamb')):
            errors.append(
                f'lr_base with opt={r["opt"]!r} and no lr_base_scale: train.py would scale the lr by '
                f'sqrt(batch / lr_base_size); set lr_base_scale: linear (the paper\'s rule) or sqrt explicitly')
    if 'amp_dtype' in recipe and not r.get('amp'):
        errors.append('amp_dtype set but amp is off: train.py would train in float32')
    if not r.get('model_ema'):
        errors += [f'{k} set but model_ema is off' for k in recipe if k.startswith('model_ema_')]
    if r.get('layer_decay') is None:
        errors += [f'{k} set but layer_decay is off' for k in recipe if k.startswith('layer_decay_')]
    mixing = (r.get('mixup') or 0) > 0 or (r.get('cutmix') or 0) > 0 or r.get('cutmix_minmax') is not None
    if not mixing:
        errors += [f'{k} set but mixup and cutmix are off' for k in ('mixup_prob', 'mixup_switch_prob',
                                                                     'mixup_mode', 'mixup_off_epoch') if k in recipe]
    else:
        if r.get('jsd_loss'):
            errors.append('jsd_loss with mixup/cutmix: train.py would use JsdCrossEntropy and drop the mixed targets')
        off, epochs = r.get('mixup_off_epoch') or 0, r.get('epochs')
        if off and epochs is not None and off >= epochs:
            errors.append(f'mixup_off_epoch={off} is not before the last epoch ({epochs}): it never switches off')
        if (r.get('mixup_prob') or 0) <= 0:
            errors.append('mixup/cutmix set but mixup_prob is 0: no batch is ever mixed')

    model_kwargs = r.get('model_kwargs') or {}
    if isinstance(model_kwargs, dict):
        dup = [k for k in model_kwargs if k in _CREATE_MODEL_KWARGS]
        if dup:
            errors.append(
                f'model_kwargs {dup} repeat arguments train.py passes to create_model itself '
                f'(set num_classes, drop, drop_path, gp, in_chans... as top-level keys instead)')
        mk_size = model_kwargs.get('img_size')
        if mk_size is not None:
            mk_size = tuple(mk_size) if isinstance(mk_size, (list, tuple)) else (mk_size, mk_size)
            data_size = None
            if r.get('input_size'):
                data_size = tuple(r['input_size'][-2:])
            elif r.get('img_size'):
                data_size = (r['img_size'], r['img_size'])
            if data_size is None:
                errors.append(
                    f'model_kwargs img_size={model_kwargs["img_size"]} but no img_size/input_size: the data '
                    f'would follow the pretrained config\'s size instead')
            elif data_size != mk_size:
                errors.append(f'data size {data_size} (img_size/input_size) differs from model_kwargs img_size '
                              f'{mk_size}')
    if r.get('img_size') and r.get('input_size'):
        errors.append('img_size and input_size both set: input_size wins; keep one')
    model = str(r.get('model') or '')
    if model.startswith('arm_') and 'timm_arm' not in (r.get('device_modules') or []):
        errors.append(f'model {model!r} needs device_modules: [timm_arm] (or the timm-arm-run launcher)')

    if check_model and r.get('layer_decay') is not None and not errors:
        reason = _lacks_group_matcher(r)
        if reason:
            errors.append(reason)
    return errors


def _lacks_group_matcher(r: Mapping[str, Any]) -> Optional[str]:
    import importlib

    import timm

    for module in r.get('device_modules') or []:
        importlib.import_module(module)
    model = timm.create_model(r['model'], pretrained=False, device='meta', **(r.get('model_kwargs') or {}))
    if not hasattr(model, 'group_matcher'):
        return (f'layer_decay={r["layer_decay"]} but {r["model"]} has no group_matcher(): timm would guess '
                f'the layers from module order')
    return None


def load_recipe(
        path: Union[str, Path],
        train_args: Union[str, Path, Mapping[str, Dict[str, Any]], None] = None,
        check_model: bool = False,
) -> Dict[str, Any]:
    """Read a train.py YAML recipe (a file, or the name of a packaged one) and raise RecipeError listing every problem
    ``check_recipe`` finds."""
    path = find_recipe(path, 'finetune')
    if not path.is_file():
        raise RecipeError(f'{path}: no such recipe file (packaged recipes: {", ".join(_packaged("finetune"))})')
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f'{path}: not valid YAML ({" ".join(str(e).split())})') from None
    if not isinstance(recipe, dict):
        raise RecipeError(f'{path}: a recipe must be a mapping of train.py arguments, got {type(recipe).__name__}')
    if not isinstance(train_args, Mapping):
        train_args = load_train_args(train_args)
    errors = check_recipe(recipe, train_args, check_model=check_model)
    if errors:
        raise RecipeError(f'{path}:\n  ' + '\n  '.join(errors))
    return recipe


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m timm_arm.recipes', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('extract', help='record the arguments of a timm train.py')
    p.add_argument('train_py')
    p.add_argument('-o', '--output', default=str(DEFAULT_TRAIN_ARGS))
    p.add_argument('--ref', default='', help='git ref (tag or sha) train.py was taken from')
    p.add_argument('--timm-version', default=None, help='default: read from timm/version.py beside train.py')
    p = sub.add_parser('check', help='validate recipes against the recorded (or a given) train.py')
    p.add_argument('recipes', nargs='*', help='files or packaged recipe names (default: every packaged recipe)')
    p.add_argument('--train-args', default=None, help='train_py_args.json or a train.py')
    p.add_argument('--check-model', action='store_true', help='also build the model (meta device)')
    args = parser.parse_args(argv)
    if args.cmd == 'extract':
        record = write_train_args(args.train_py, args.output, args.ref, args.timm_version)
        print(f'{len(record["args"])} arguments of timm {record["timm_version"]} ({args.ref}) -> {args.output}')
        return 0
    failed = 0
    for path in args.recipes or [RECIPES / 'finetune' / f'{name}.yaml' for name in _packaged('finetune')]:
        try:
            load_recipe(path, args.train_args, check_model=args.check_model)
            print(f'ok      {path}')
        except RecipeError as e:
            failed += 1
            print(f'FAILED  {e}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
