""" Fine-tuning as timm's train.py does it: create_model with the recipe's model args and --pretrained-path
semantics, create_optimizer_v2 with layer decay, a few real training steps with mixup/cutmix on generated images,
EMA; and the layer-wise lr scales the paper's recipe implies. """
import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from timm import create_model
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask
from timm.utils import unwrap_model

from timm_arm.recipes import load_recipe, train_args_defaults

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(embed_dim=32, depth=2, patch_size=8)  # encoder shape shared by the "pretraining" export and the model


def _export_encoder(path: Path, img_size: int = 32, prefix: str = '', **kwargs) -> dict:
    """An AR-pretraining-style export: 1 causal direction, sin-cos positions, no class token, no head."""
    encoder = create_model(
        'arm_mamba_tiny', **{**TINY, **kwargs}, img_size=img_size, num_classes=0, num_directions=1,
        class_token=False, pos_embed='sincos')
    state = {prefix + k: v.contiguous() for k, v in encoder.state_dict().items()}
    if prefix:  # a pretrainer checkpoint also carries its decoder: dropped at load
        state['decoder.head.weight'] = torch.zeros(4, 4)
    save_file(state, str(path))
    return encoder.state_dict()


def _train_py_args(recipe: str, **overrides) -> argparse.Namespace:
    """train.py's args: its defaults, then the recipe (parser.set_defaults), then command-line overrides."""
    args = {**train_args_defaults(), **load_recipe(ROOT / 'recipes' / 'finetune' / recipe)}
    model_kwargs = {**args['model_kwargs'], **overrides.pop('model_kwargs', {})}
    return argparse.Namespace(**{**args, **overrides, 'model_kwargs': model_kwargs})


def _create_model_like_train_py(args: argparse.Namespace):
    factory_kwargs = {}
    if args.pretrained_path:
        factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    return create_model(
        args.model,
        pretrained=args.pretrained,
        in_chans=3,
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        scriptable=args.torchscript,
        checkpoint_path=args.initial_checkpoint,
        **factory_kwargs,
        **args.model_kwargs,
    )


def _images(num_classes: int = 3, per_class: int = 8, size: int = 32):
    """Colour-coded classes with noise: learnable in a few steps."""
    colors = torch.tensor([[1., -1., -1.], [-1., 1., -1.], [-1., -1., 1.]])[:num_classes]
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = colors[y].view(-1, 3, 1, 1) + 0.8 * torch.randn(len(y), 3, size, size)
    return x, y


def test_finetune_flow(tmp_path):
    export = tmp_path / 'model.safetensors'
    pretrained = _export_encoder(export, img_size=16, prefix='encoder.')
    # fine-tune at 32 px (4 x 4 grid) from a 16 px (2 x 2) export, as the paper goes from 192 to 224
    # the ImageNet recipe (layer decay 0.65, EMA, mixup / cutmix) on a small model
    args = _train_py_args(
        'arm_mamba_base_in1k.yaml', model='arm_mamba_tiny', pretrained_path=str(export), num_classes=3,
        img_size=32, model_kwargs=dict(TINY, img_size=32), lr=2e-3, epochs=1, warmup_epochs=0, device='cpu',
        model_ema_decay=0.9)
    model = _create_model_like_train_py(args)

    state = model.state_dict()
    assert torch.equal(state['blocks.1.mixer.in_proj.weight'], pretrained['blocks.1.mixer.in_proj.weight'])
    for k in range(4):  # the one pretraining direction is copied into all four
        assert torch.equal(state['blocks.0.mixer.x_proj_weight'][k], pretrained['blocks.0.mixer.x_proj_weight'][0])
    assert state['pos_embed'].shape == (1, 4 * 4 + 1, 32)
    assert state['pos_embed'][0, 8].abs().sum() == 0  # the class position, zero, in the middle
    assert model.get_classifier().out_features == 3

    task = ClassificationTask(model=model, criterion=SoftTargetCrossEntropy(), device=torch.device('cpu'))
    model = task.get_trainable_module()
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    scales = sorted({g['lr_scale'] for g in optimizer.param_groups})
    assert scales == pytest.approx([0.65 ** 3, 0.65 ** 2, 0.65, 1.0])  # stem, block 0, block 1, norm + head
    steps = 20
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=steps)
    task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    mixup = Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=args.num_classes)

    x, y = _images()

    def eval_loss(m):
        m.eval()
        with torch.no_grad():
            return F.cross_entropy(m(x), y).item()

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    before = eval_loss(model)
    for step in range(steps):
        model.train()
        idx = torch.randperm(len(y))[:8]
        inputs, targets = mixup(x[idx], y[idx])
        loss = task(inputs, targets)['loss']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        task.update_ema(step=step + 1)
        scheduler.step_update(num_updates=step + 1)
    after = eval_loss(model)
    assert after < 0.8 * before, (before, after)

    ema = unwrap_model(task.get_trainable_module(ema=True)).state_dict()
    key = 'blocks.1.mixer.in_proj.weight'
    moved_model = (model.state_dict()[key] - initial[key]).norm()
    moved_ema = (ema[key] - initial[key]).norm()
    assert 0 < moved_ema < moved_model


@pytest.mark.parametrize('prefix', ['', 'encoder.'])
def test_pretrained_path_layouts(tmp_path, prefix):
    export = tmp_path / 'model.safetensors'
    pretrained = _export_encoder(export, img_size=32, prefix=prefix)
    model = create_model(
        'arm_mamba_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(export), num_classes=-1),
        num_classes=10, **TINY, img_size=32)
    assert torch.equal(model.state_dict()['norm.weight'], pretrained['norm.weight'])


@pytest.mark.parametrize('other, expected', [
    (dict(embed_dim=48), r'shape mismatch \(\d+\): blocks\.0\.mixer\.A_log: checkpoint \(4, 48, 16\) vs model \(4, 32'),
    (dict(depth=3), r'unexpected \(\d+\): blocks\.2\.'),
    (dict(depth=1), r'missing \(\d+\): blocks\.1\.'),
])
def test_pretrained_of_other_size_lists_keys(tmp_path, other, expected):
    export = tmp_path / 'other.safetensors'
    _export_encoder(export, **other)
    with pytest.raises(RuntimeError, match=expected):
        create_model(
            'arm_mamba_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(export), num_classes=-1),
            num_classes=10, **TINY, img_size=32)


def test_pretrained_of_other_architecture(tmp_path):
    export = tmp_path / 'vit.safetensors'
    vit = create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(export))
    with pytest.raises(RuntimeError, match=r'Checkpoint does not fit ArmMamba.*\n.*missing.*blocks\.0\.mixer'):
        create_model(
            'arm_mamba_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(export), num_classes=-1),
            num_classes=10, **TINY, img_size=32)


def _scales(variant: str, layer_decay: float):
    """param name -> (lr_scale, weight_decay) as create_optimizer_v2 (train.py's --layer-decay) makes them."""
    model = create_model(variant, device='meta')
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(p)]: (g['lr_scale'], g['weight_decay']) for g in optimizer.param_groups for p in g['params']}
    assert set(out) == set(names.values())
    return out


def _paper_layer_id(name: str, depth: int) -> int:
    """BEiT/MAE rule of the paper's reference code: 0 for patch embed, pos embed and class token, i + 1 for block
    i, depth + 1 for everything after the blocks (final norm, head); scale = decay ** (depth + 1 - layer_id)."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


@pytest.mark.parametrize('variant, layer_decay, depth', [('arm_mamba_base', 0.65, 12), ('arm_mamba_large', 0.75, 24)])
def test_layer_decay_scales(variant, layer_decay, depth):
    groups = _scales(variant, layer_decay)
    scale = {k: v[0] for k, v in groups.items()}
    decay = {k: v[1] for k, v in groups.items()}
    for name, s in scale.items():
        assert s == pytest.approx(layer_decay ** (depth + 1 - _paper_layer_id(name, depth))), name
    assert scale['pos_embed'] == scale['patch_embed.proj.weight'] == pytest.approx(layer_decay ** (depth + 1))
    assert scale['blocks.0.mixer.in_proj.weight'] == pytest.approx(layer_decay ** depth)
    assert scale[f'blocks.{depth - 1}.mlp.fc1.weight'] == pytest.approx(layer_decay)
    assert scale['head.fc.weight'] == 1.0
    assert scale['norm.weight'] == 1.0  # the final norm sits with the head, as in the paper's recipe
    # weight decay: matrices only; SSM parameters, biases, norms, positions and class token are exempt
    assert decay['blocks.0.mixer.in_proj.weight'] == decay['head.fc.weight'] == 0.05
    for name in ('blocks.0.mixer.A_log', 'blocks.0.mixer.D', 'blocks.0.mixer.dt_proj_bias', 'pos_embed',
                 'cls_token', 'norm.weight', 'head.fc.bias'):
        assert decay[name] == 0., name


def test_layer_decay_final_norm_as_paper():
    # the paper's recipe keeps the final norm at lr scale 1.0, with the head
    assert _scales('arm_mamba_base', 0.65)['norm.weight'][0] == 1.0
