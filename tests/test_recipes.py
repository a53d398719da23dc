""" The train.py recipes in recipes/finetune: every key is a real train.py argument (as recorded, with the timm
version, in timm_arm/train_py_args.json), the values are the paper's, and bad recipes fail at load. """
import json
import os
from pathlib import Path

import pytest
import torch.nn as nn
import yaml

import timm
from timm.models import register_model

from timm_arm.recipes import (
    RecipeError,
    check_recipe,
    extract_train_args,
    load_recipe,
    load_train_args,
    train_args_defaults,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / 'recipes' / 'finetune').glob('*.yaml'))
ARGS_FILE = ROOT / 'timm_arm' / 'train_py_args.json'
NUM_GPUS = 8  # the paper's global batch of 1024 is batch_size x grad_accum_steps x 8 GPUs


@pytest.fixture(scope='module')
def train_args():
    return load_train_args(ARGS_FILE)


def test_train_args_record(train_args):
    record = json.loads(ARGS_FILE.read_text())
    assert record['timm_version'] and record['source_ref']
    for dest in ('model', 'pretrained_path', 'model_kwargs', 'device_modules', 'layer_decay', 'lr_base',
                 'lr_base_scale', 'model_ema_decay', 'mixup', 'cutmix', 'reprob', 'smoothing', 'amp_dtype'):
        assert dest in train_args
    assert '--pretrained-path' in train_args['pretrained_path']['options']
    assert train_args['device_modules']['nargs'] == '+'


@pytest.mark.skipif(not os.environ.get('TIMM_TRAIN_PY'), reason='set TIMM_TRAIN_PY to a timm train.py to compare')
def test_train_args_record_is_current():
    """TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py: the record matches that train.py."""
    fresh = extract_train_args(Path(os.environ['TIMM_TRAIN_PY']).read_text())
    assert fresh == json.loads(ARGS_FILE.read_text())['args']


def test_extract_train_args():
    source = '''
import argparse
parser = argparse.ArgumentParser()
group = parser.add_argument_group('x')
parser.add_argument('data', nargs='?', metavar='DIR')
group.add_argument('-b', '--batch-size', type=int, default=128)
group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
group.add_argument('--amp', action='store_true', default=False)
group.add_argument('--torchscript', dest='torchscript_flag', action='store_true')
group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
'''
    args = {a['dest']: a for a in extract_train_args(source)}
    assert set(args) == {'data', 'batch_size', 'ratio', 'amp', 'torchscript_flag', 'model_kwargs'}
    assert args['batch_size'] == {'dest': 'batch_size', 'options': ['-b', '--batch-size'], 'type': 'int',
                                  'default': 128}
    assert args['ratio']['default'] == [0.75, 4 / 3]
    assert args['model_kwargs']['action'] == 'utils.ParseKwargs'


@pytest.mark.parametrize('path', RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_keys_are_train_py_args(path, train_args):
    recipe = load_recipe(path, train_args, check_model=True)  # also builds the model on the meta device
    assert set(recipe) <= set(train_args)
    assert recipe['device_modules'] == ['timm_arm']


@pytest.mark.parametrize('name, layer_decay, drop_path, size', [
    ('arm_mamba_base_in1k', 0.65, 0.1, 224),
    ('arm_mamba_large_in1k', 0.75, 0.3, 224),
    ('arm_mamba_huge_in1k', 0.75, 0.3, 224),
    ('arm_mamba_huge_in1k_384', 0.75, 0.3, 384),
])
def test_paper_recipe(name, layer_decay, drop_path, size, train_args):
    r = load_recipe(ROOT / 'recipes' / 'finetune' / f'{name}.yaml', train_args)
    assert r['model'].endswith('.arm_in1k_ar') and r['pretrained'] and r['num_classes'] == 1000
    assert r['img_size'] == r['model_kwargs']['img_size'] == size
    assert (r['layer_decay'], r['drop_path']) == (layer_decay, drop_path)
    assert r['batch_size'] * r.get('grad_accum_steps', 1) * NUM_GPUS == 1024
    assert (r['opt'], r['lr_base'], r['lr_base_size'], r['lr_base_scale']) == ('adamw', 5e-4, 256, 'linear')
    assert (r['epochs'], r['weight_decay'], r['sched']) == (100, 0.05, 'cosine')
    assert (r['mixup'], r['cutmix'], r['reprob'], r['smoothing']) == (0.8, 1.0, 0.25, 0.1)
    assert r['model_ema'] and r['model_ema_decay'] == 0.99992
    assert r['amp'] and r['amp_dtype'] == 'bfloat16'


def test_cifar_pair_differs_only_in_init(train_args):
    ft = load_recipe(ROOT / 'recipes' / 'finetune' / 'arm_mamba_tiny_patch4_32_cifar10.yaml', train_args)
    scratch = load_recipe(ROOT / 'recipes' / 'finetune' / 'arm_mamba_tiny_patch4_32_cifar10_scratch.yaml', train_args)
    assert ft.pop('pretrained') and not scratch.pop('pretrained')
    models = ft.pop('model'), scratch.pop('model')
    assert models == ('arm_mamba_tiny_patch4_32.arm_cifar10_ar', 'arm_mamba_tiny_patch4_32')
    assert ft == scratch
    assert ft['num_classes'] == 10 and ft['val_split'] == 'test' and ft['crop_pct'] == 1.0


def test_cifar_recipes_fit_one_geometry(train_args):
    """The pretraining recipe and the fine-tuning pair describe one encoder: 32 px, patch 4, 192 x 12."""
    from timm_arm.models.arm_pretrain import create_pretrainer
    from timm_arm.pretrain.cli import parse_args
    pretrain = parse_args(['-c', str(ROOT / 'recipes' / 'pretrain' / 'arm_mamba_tiny_patch4_32_cifar10.yaml')])
    model = create_pretrainer(pretrain.model, img_size=pretrain.img_size, device='meta', **pretrain.model_kwargs)
    ft = load_recipe(ROOT / 'recipes' / 'finetune' / 'arm_mamba_tiny_patch4_32_cifar10.yaml', train_args)
    classifier = timm.create_model(ft['model'], num_classes=ft['num_classes'], device='meta')
    assert classifier.patch_embed.grid_size == model.encoder.patch_embed.grid_size == (8, 8)
    assert (classifier.embed_dim, len(classifier.blocks)) == (model.encoder.embed_dim, len(model.encoder.blocks))
    assert model.num_clusters == 16 and pretrain.in_memory == 'auto'


@register_model
def _test_model_without_group_matcher(pretrained=False, **kwargs):
    return nn.Linear(4, 4)


GOOD = dict(model='arm_mamba_tiny', device_modules=['timm_arm'])


@pytest.mark.parametrize('bad, message', [
    ({'layer-decay': 0.65}, "use 'layer_decay'"),
    ({'layer_decy': 0.65}, "did you mean 'layer_decay'"),
    ({'epochs': 100.0}, 'epochs: expected int'),
    ({'amp': 'yes'}, 'amp: expected true/false'),
    ({'opt_betas': 0.9}, 'expected a list'),
    ({'model_kwargs': 'img_size=96'}, 'expected a mapping'),
    ({'train_size_schedule': 'linear'}, 'is not one of'),
    ({'lr': 1e-3, 'lr_base': 5e-4}, 'lr and lr_base both set'),
    ({'opt': 'adamw', 'lr_base': 5e-4}, 'lr_base_scale'),
    ({'amp_dtype': 'bfloat16'}, 'amp is off'),
    ({'model_ema_decay': 0.99992}, 'model_ema is off'),
    ({'layer_decay_min_scale': 0.1}, 'layer_decay is off'),
    ({'mixup_prob': 0.5}, 'mixup and cutmix are off'),
    ({'mixup': 0.8, 'jsd_loss': True}, 'jsd_loss with mixup'),
    ({'cutmix': 1.0, 'mixup_off_epoch': 100, 'epochs': 100}, 'never switches off'),
    ({'mixup': 0.8, 'mixup_prob': 0.0}, 'no batch is ever mixed'),
    ({'model_kwargs': {'num_classes': 10}}, 'repeat arguments train.py passes'),
    ({'model_kwargs': {'drop_path_rate': 0.1}}, 'repeat arguments train.py passes'),
    ({'img_size': 64, 'model_kwargs': {'img_size': 96}}, 'differs from model_kwargs img_size'),
    ({'model_kwargs': {'img_size': 96}}, 'no img_size/input_size'),
    ({'img_size': 96, 'input_size': [3, 96, 96]}, 'img_size and input_size both set'),
    ({'device_modules': None}, 'needs device_modules'),
    ({'config': 'other.yaml'}, 'cannot name another config'),
])
def test_bad_recipe(bad, message, train_args, tmp_path):
    recipe = {**GOOD, **bad}
    errors = check_recipe(recipe, train_args)
    assert any(message in e for e in errors), errors
    path = tmp_path / 'bad.yaml'
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match='bad.yaml'):
        load_recipe(path, train_args)


def test_layer_decay_needs_group_matcher(train_args):
    recipe = dict(model='_test_model_without_group_matcher', layer_decay=0.65)
    assert check_recipe(recipe, train_args) == []
    errors = check_recipe(recipe, train_args, check_model=True)
    assert len(errors) == 1 and 'no group_matcher' in errors[0]


def test_recipe_must_be_mapping(tmp_path, train_args):
    path = tmp_path / 'list.yaml'
    path.write_text('- model\n- arm_mamba_tiny\n')
    with pytest.raises(RecipeError, match='must be a mapping'):
        load_recipe(path, train_args)


def test_defaults_are_train_py_defaults(train_args):
    defaults = train_args_defaults(train_args)
    assert defaults['opt'] == 'sgd' and defaults['lr'] is None and defaults['amp'] is False
    assert defaults['scale'] == [0.08, 1.0] and defaults['model_kwargs'] == {}


def test_recipes_found_by_name_from_an_installed_wheel(tmp_path, monkeypatch, capsys):
    """Recipes ship inside the package: `-c NAME` and `python -m timm_arm.recipes check` work from any folder."""
    from timm_arm.pretrain.cli import parse_args
    from timm_arm.recipes import RECIPES, main
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    args = parse_args(['-c', 'arm_mamba_tiny_patch4_32_cifar10'])
    assert (args.model, args.img_size) == ('arm_mamba_tiny_patch4_32', 32)
    assert args.config == str(RECIPES / 'pretrain' / 'arm_mamba_tiny_patch4_32_cifar10.yaml')
    assert main(['check']) == 0  # every packaged fine-tuning recipe
    out = capsys.readouterr().out
    assert out.count('ok ') == len(list((RECIPES / 'finetune').glob('*.yaml'))) >= 6
    assert main(['check', 'arm_mamba_base_in1k']) == 0
    assert main(['check', 'no_such_recipe']) == 1
    assert 'no such recipe file' in capsys.readouterr().out
