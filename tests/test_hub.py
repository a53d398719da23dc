""" Pretrained weights on the Hub: the registered tags, `timm-arm-hub convert / verify / publish`, and an offline
proof that a converted folder, placed in a Hugging Face cache exactly as a download leaves it, is what
timm.create_model(<name>.<tag>, pretrained=True) and hf-hub: load. Tiny models, CPU, no network.
"""
import argparse
import hashlib
import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from reference_impl import reference_forward, to_reference_layout
from safetensors.torch import load_file, save_file

import timm

from timm_arm.hub import ENCODER_FORM, HubError, main, publish, read_checkpoint, verify
from timm_arm.models import checkpoint_filter_fn
from timm_arm.models.arm_mamba import HUB_ORG

SMALL = dict(embed_dim=32, depth=2, img_size=32, patch_size=8)  # 4 x 4 patches
SMALL_KWARGS = ['--model-kwargs', 'embed_dim=32', 'depth=2', 'img_size=32', 'patch_size=8']
FILES = ['README.md', 'config.json', 'model.safetensors']


class NotAllowed:
    """A class a checkpoint must never make us unpickle."""


def _perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if 'A_log' in name or name.endswith('.D') else 0.1))
    return model.eval()


def _classifier(**kwargs):
    return _perturbed(timm.create_model('arm_mamba_tiny', **{**SMALL, **kwargs}))


def _encoder(**kwargs):
    return _perturbed(timm.create_model(
        'arm_mamba_tiny', **{**SMALL, **kwargs}, num_classes=0, **ENCODER_FORM))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _reference_finetune_checkpoint(path: Path, **kwargs) -> dict:
    """The reference code's fine-tuning checkpoint: model, model_ema, optimizer, epoch, argparse args."""
    model = to_reference_layout(_classifier(**kwargs).state_dict())
    ema = to_reference_layout(_classifier(**kwargs).state_dict())
    torch.save({
        'model': model, 'model_ema': ema, 'optimizer': {'state': {}, 'param_groups': [{'lr': 5e-4, 'params': [0]}]},
        'epoch': 99, 'scaler': {'scale': 65536.0}, 'max_accuracy': 83.2, 'ema_max_accuracy': 83.1,
        'args': argparse.Namespace(model='arm_base_pz16', input_size=32, global_pool=True, drop_path=0.1),
    }, path)
    return {'model': model, 'model_ema': ema}


def _reference_pretrain_checkpoint(path: Path) -> dict:
    """The reference code's pretraining checkpoint: 1-direction encoder plus decoder keys, which are dropped."""
    encoder = _encoder()
    state = to_reference_layout(encoder.state_dict())
    state.update({'enc2dec.weight': torch.randn(64, 128), 'ar_token': torch.randn(1, 1, 16),
                  'dec_block.0.attn2.q.weight': torch.randn(16, 16), 'mask': torch.zeros(8, 8)})
    torch.save({'model': state, 'optimizer': {}, 'epoch': 1599, 'args': argparse.Namespace(model='arm_base_pz16')},
               path)
    return encoder


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _as_hub_download(folder: Path, cache: Path, repo_id: str, revision: str = 'a' * 40) -> None:
    """Lay `folder` out in a Hugging Face cache as hf_hub_download leaves it: content-addressed blobs (sha256 for
    LFS files, git blob sha1 for the rest), a snapshot of relative symlinks, refs/main naming the revision."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'blobs').mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    snapshot = repo / 'snapshots' / revision
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        if file.suffix == '.safetensors':
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
        (repo / 'blobs' / etag).write_bytes(data)
        (snapshot / file.name).symlink_to(Path('..', '..', 'blobs', etag))


def test_registered_tags_name_hub_repos_and_full_data_config():
    import timm_arm  # noqa: F401
    for arch in ('arm_mamba_base', 'arm_mamba_large', 'arm_mamba_huge'):
        tags = {'arm_in1k': (224, 1000), 'arm_in1k_ar': (192, 0)}
        if arch == 'arm_mamba_huge':
            tags['arm_in1k_384'] = (384, 1000)
        for tag, (size, num_classes) in tags.items():
            cfg = timm.models.get_pretrained_cfg(f'{arch}.{tag}').to_dict()
            assert cfg['hf_hub_id'] == f'{HUB_ORG}/{arch}.{tag}'
            assert cfg['input_size'] == (3, size, size) and cfg['num_classes'] == num_classes
            for key in ('crop_pct', 'mean', 'std', 'interpolation', 'license', 'paper_ids'):
                assert cfg[key], key
        assert timm.models.get_pretrained_cfg(arch).tag == 'arm_in1k'  # pretrained=True -> the classifier
    assert set(timm.list_pretrained('arm_mamba_huge*')) == {
        'arm_mamba_huge.arm_in1k', 'arm_mamba_huge.arm_in1k_384', 'arm_mamba_huge.arm_in1k_ar'}


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """Reference-code checkpoints (fine-tuning and pretraining) converted into Hub folders."""
    root = tmp_path_factory.mktemp('published')
    sources = {'ft': root / 'checkpoint-best.pth', 'pt': root / 'checkpoint-1599.pth'}
    torch.manual_seed(0)
    ft = _reference_finetune_checkpoint(sources['ft'])
    encoder = _reference_pretrain_checkpoint(sources['pt'])
    out = {'ft': root / 'hub' / 'arm_mamba_base.arm_in1k', 'pt': root / 'hub' / 'arm_mamba_base.arm_in1k_ar'}
    assert main(['convert', str(sources['ft']), str(out['ft']), '--model', 'arm_mamba_base.arm_in1k',
                 *SMALL_KWARGS]) == 0
    # no tag: chosen from the checkpoint (a 1-direction encoder -> arm_in1k_ar); img_size from its pos_embed
    assert main(['convert', str(sources['pt']), str(out['pt']), '--model', 'arm_mamba_base',
                 '--model-kwargs', 'embed_dim=32', 'depth=2', 'patch_size=8', 'img_size=32']) == 0
    return SimpleNamespace(root=root, sources=sources, out=out, ft=ft, encoder=encoder)


def test_convert_writes_a_complete_timm_folder(published):
    folder = published.out['ft']
    assert sorted(p.name for p in folder.iterdir()) == FILES
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted(published.out[k].name for k in published.out)
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'arm_mamba_base'
    assert config['model_args']['embed_dim'] == 32 and config['model_args']['num_classes'] == 1000
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, 32, 32] and cfg['license'] == 'apache-2.0' and cfg['paper_ids']
    assert config['conversion']['source'] == 'checkpoint-best.pth' and config['conversion']['entry'] == 'model'
    card = (folder / 'README.md').read_text()
    for text in ('# Model card for arm_mamba_base.arm_in1k', 'license: apache-2.0', '| ARM-H |', '85.5', '83.2',
                 "timm.create_model('arm_mamba_base.arm_in1k', pretrained=True)", '@inproceedings{ren2025',
                 'hf-hub:timm-arm/arm_mamba_base.arm_in1k'):
        assert text in card, text
    # the stored weights are the reference weights, converted: same logits as a literal reference forward
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(model(x), reference_forward(published.ft['model'], x, 8)) < 1e-4


def test_encoder_folder_loads_in_both_forms(published):
    folder = published.out['pt']
    weights = load_file(folder / 'model.safetensors')
    assert weights['blocks.0.mixer.x_proj_weight'].shape[0] == 1 and 'cls_token' not in weights
    assert not any(k.startswith(('enc2dec', 'dec_', 'ar_', 'mask')) for k in weights)
    config = json.loads((folder / 'config.json').read_text())
    assert config['pretrained_cfg']['tag'] == 'arm_in1k_ar' and config['num_classes'] == 0
    assert not set(ENCODER_FORM) & set(config['model_args'])  # shape only: timm builds the classifier from it
    x = torch.randn(2, 3, 32, 32)
    encoder = timm.create_model(f'local-dir:{folder}', pretrained=True, **ENCODER_FORM).eval()
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), published.encoder.forward_features(x))
    classifier = timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=5, img_size=48)
    x_proj = classifier.blocks[1].mixer.x_proj_weight
    assert x_proj.shape[0] == 4 and all(torch.equal(x_proj[k], x_proj[0]) for k in range(4))
    assert 'image-feature-extraction' in (folder / 'README.md').read_text()


def test_offline_hub_cache_tag_and_hf_hub_names(published, tmp_path):
    """HF_HUB_OFFLINE=1 in a fresh process: the registered tag and hf-hub: both read the cache, no network."""
    cache = tmp_path / 'hf' / 'hub'
    for folder in published.out.values():
        _as_hub_download(folder, cache, f'{HUB_ORG}/{folder.name}')
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    script = f"""
import sys, torch, timm, timm_arm
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE == {str(cache)!r}
x, out = torch.load(sys.argv[1]), {{}}
with torch.no_grad():
    m = timm.create_model('arm_mamba_base.arm_in1k', pretrained=True, {', '.join(f'{k}={v}' for k, v in SMALL.items())})
    out['tag'], out['tag_hub_id'] = m.eval()(x), m.pretrained_cfg['hf_hub_id']
    out['hf_hub'] = timm.create_model('hf-hub:{HUB_ORG}/arm_mamba_base.arm_in1k', pretrained=True).eval()(x)
    e = timm.create_model('hf-hub:{HUB_ORG}/arm_mamba_base.arm_in1k_ar', pretrained=True, num_directions=1,
                          class_token=False, pos_embed='sincos')
    out['ar_features'] = e.eval().forward_features(x)
    c = timm.create_model('arm_mamba_base.arm_in1k_ar', pretrained=True, embed_dim=32, depth=2, patch_size=8,
                          img_size=48, num_classes=10)  # the fine-tuning starting point
    out['ar_x_proj'], out['ar_pos'] = c.blocks[0].mixer.x_proj_weight.detach(), tuple(c.pos_embed.shape)
torch.save(out, sys.argv[2])
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1')
    proc = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'x.pt'), str(tmp_path / 'out.pt')],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = torch.load(tmp_path / 'out.pt')

    source = timm.create_model('arm_mamba_tiny', **SMALL)
    source.load_state_dict(checkpoint_filter_fn(read_checkpoint(published.sources['ft'], 'model')[0], source))
    with torch.no_grad():
        expected = source.eval()(x)
        literal = reference_forward(published.ft['model'], x, 8)
        features = published.encoder.forward_features(x)
    assert out['tag_hub_id'] == f'{HUB_ORG}/arm_mamba_base.arm_in1k'
    assert torch.equal(out['tag'], out['hf_hub'])
    assert _rel(out['tag'], expected) < 1e-5 and _rel(out['tag'], literal) < 1e-4
    assert _rel(out['ar_features'], features) < 1e-5
    pretrained_x_proj = published.encoder.blocks[0].mixer.x_proj_weight[0]
    assert all(torch.equal(out['ar_x_proj'][k], pretrained_x_proj) for k in range(4))
    assert out['ar_pos'] == (1, 37, 32)  # 6 x 6 grid + class position


def test_verify_cli(published, capsys):
    rc, out, err = _run(['verify', published.out['ft'], '--source', published.sources['ft']], capsys)
    assert rc == 0 and 'match' in out and 'max relative error' in out, err
    rc, out, err = _run(['verify', published.out['pt'], '--source', published.sources['pt']], capsys)
    assert rc == 0 and 'features' in out, err
    # EMA weights are a different model: verification against them fails, one line, exit 2
    rc, out, err = _run(['verify', published.out['ft'], '--source', published.sources['ft'], '--entry', 'model_ema'],
                        capsys)
    assert rc == 2 and err.count('\n') == 1 and 'logits differ' in err


def test_convert_ema_entry_and_determinism(published, tmp_path, capsys):
    out = tmp_path / 'ema'
    rc, _, err = _run(['convert', published.sources['ft'], out, '--model', 'arm_mamba_base.arm_in1k', '--ema',
                       *SMALL_KWARGS], capsys)
    assert rc == 0, err
    expected = checkpoint_filter_fn(published.ft['model_ema'], timm.create_model('arm_mamba_tiny', **SMALL))
    weights = load_file(out / 'model.safetensors')
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    # the same source converts to the same bytes: re-publishing a re-conversion uploads nothing
    again = tmp_path / 'again'
    assert main(['convert', str(published.sources['ft']), str(again), '--model', 'arm_mamba_base.arm_in1k',
                 *SMALL_KWARGS]) == 0
    for name in FILES:
        assert (again / name).read_bytes() == (published.out['ft'] / name).read_bytes(), name


def test_convert_our_own_checkpoints(tmp_path, capsys):
    model = _classifier(num_classes=10)
    # timm train.py checkpoint of a DDP model: state_dict / state_dict_ema entries, 'module.' prefix
    train_py = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 3, 'arch': 'arm_mamba_tiny', 'args': argparse.Namespace(model='arm_mamba_tiny'),
                'state_dict': {'module.' + k: v for k, v in model.state_dict().items()}}, train_py)
    # a bare safetensors state dict
    bare = tmp_path / 'weights.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, bare)
    # our pretrainer: a training checkpoint (encoder. prefix + decoder) and its export folder
    encoder = _encoder()
    pretrain_ckpt = tmp_path / 'checkpoint-00000010.pth'
    torch.save({'model': {**{'encoder.' + k: v for k, v in encoder.state_dict().items()},
                          'decoder.head.weight': torch.zeros(4, 4)}, 'step': 10}, pretrain_ckpt)
    export = tmp_path / 'export'
    export.mkdir()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, export / 'model.safetensors')
    (export / 'config.json').write_text(json.dumps({'architecture': 'arm_mamba_tiny', 'model_args': {}}))

    # the weights are compared directly, so conversions past the first skip their own verification
    for src, reference, check in ((train_py, model, []), (bare, model, ['--no-verify']),
                                  (pretrain_ckpt, encoder, ['--no-verify']), (export, encoder, ['--no-verify'])):
        out = tmp_path / f'out-{src.name}'
        rc, _, err = _run(['convert', src, out, '--model', 'arm_mamba_tiny', '--model-kwargs', 'embed_dim=32',
                           'depth=2', 'patch_size=8', *check], capsys)
        assert rc == 0, err
        weights = load_file(out / 'model.safetensors')
        assert all(torch.equal(weights[k], v) for k, v in reference.state_dict().items()), src.name
    assert verify(out, export, log=lambda msg: None) == 0.0


def test_convert_a_train_py_run_by_itself(tmp_path, capsys):
    """A train.py output folder: the model, its geometry (patch 8 at 32 px) and its data config (crop 1.0, bilinear)
    come from the checkpoint and args.yaml, without --model or --model-kwargs; --ema takes train.py's EMA entry."""
    model, ema = _classifier(num_classes=10), _classifier(num_classes=10)
    run = tmp_path / 'train' / 'run'
    run.mkdir(parents=True)
    torch.save({'epoch': 29, 'arch': 'arm_mamba_tiny', 'args': argparse.Namespace(model='arm_mamba_tiny'),
                'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict()}, run / 'last.pth.tar')
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(
        model='arm_mamba_tiny.untrained', model_kwargs=dict(embed_dim=32, depth=2), num_classes=10, crop_pct=1.0,
        interpolation='bilinear', mean=None, std=None, img_size=None)))
    for argv, reference in (([], model), (['--ema'], ema)):
        out = tmp_path / f'out{len(argv)}'
        rc, _, err = _run(['convert', run / 'last.pth.tar', out, *argv], capsys)
        assert rc == 0, err
        weights = load_file(out / 'model.safetensors')
        assert all(torch.equal(weights[k], v) for k, v in reference.state_dict().items())
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'arm_mamba_tiny' and config['model_args']['patch_size'] == 8
    cfg = config['pretrained_cfg']
    assert (cfg['input_size'], cfg['crop_pct'], cfg['interpolation'], cfg['num_classes']) == (
        [3, 32, 32], 1.0, 'bilinear', 10)
    card = (out / 'README.md').read_text()
    assert '# Model card for arm_mamba_tiny\n' in card and 'untrained' not in card
    assert "timm.create_model('hf-hub:timm-arm/arm_mamba_tiny', pretrained=True)" in card
    assert 'No results were recorded' in card and 'ARM-B' not in card and '83.2' not in card  # no foreign results
    assert 'crop 1.0' in card and 'bilinear' in card
    local = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(local(x), ema(x), atol=1e-5)
    # no args.yaml and no --model: an error that says what to do
    (run / 'args.yaml').unlink()
    rc, _, err = _run(['convert', run / 'last.pth.tar', tmp_path / 'none'], capsys)
    assert rc == 2 and 'Pass --model' in err


def test_existing_out_dir_refused_unless_overwrite(published, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    argv = ['convert', published.sources['ft'], out, '--model', 'arm_mamba_base.arm_in1k', *SMALL_KWARGS]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and err == f'timm-arm-hub: {out}: already exists (pass --overwrite to replace it)\n'
    assert [p.name for p in out.iterdir()] == ['keep.txt']
    rc, _, err = _run(argv + ['--overwrite'], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert [p.name for p in tmp_path.iterdir()] == ['out']  # no partial or backup folders left behind


def _bad_inputs(tmp: Path, published) -> dict:
    """name -> (source file, extra argv, expected words in the error)."""
    real = published.sources['ft'].read_bytes()
    cases = {}
    (tmp / 'truncated.pth').write_bytes(real[:len(real) // 2])
    cases['truncated pth'] = ('truncated.pth', [], 'truncated or corrupt')
    weights = (published.out['ft'] / 'model.safetensors').read_bytes()
    (tmp / 'truncated.safetensors').write_bytes(weights[:len(weights) // 2])
    cases['truncated safetensors'] = ('truncated.safetensors', [], 'not a readable safetensors file')
    (tmp / 'random.bin').write_bytes(random.Random(0).randbytes(4096))
    cases['random bytes'] = ('random.bin', [], 'not a PyTorch checkpoint')
    torch.save([torch.zeros(2), 1], tmp / 'list.pth')
    cases['pickle of a list'] = ('list.pth', [], 'holds a list, not a dict of tensors')
    torch.save({'epoch': 3, 'lr': 0.1}, tmp / 'no_tensors.pth')
    cases['dict without tensors'] = ('no_tensors.pth', [], 'no tensors found')
    torch.save({'model': _classifier().state_dict(), 'extra': NotAllowed()}, tmp / 'global.pth')
    cases['disallowed global'] = ('global.pth', [], 'refused to unpickle test_hub.NotAllowed')
    torch.save({'model': to_reference_layout(_classifier(embed_dim=48).state_dict())}, tmp / 'other_size.pth')
    cases['another size'] = ('other_size.pth', [], 'another size: embed_dim=48, depth=2, the model embed_dim=32')
    state = to_reference_layout(_classifier().state_dict())
    del state['head.weight'], state['head.bias']
    torch.save({'model': state}, tmp / 'no_head.pth')
    cases['missing head'] = ('no_head.pth', [], 'missing keys (2): head.fc.weight, head.fc.bias')
    state = to_reference_layout(_classifier().state_dict())
    del state['layers.1.mlp.w3.weight']
    torch.save({'model': state}, tmp / 'no_mlp.pth')
    cases['missing layer key'] = ('no_mlp.pth', [], 'missing key layers.1.mlp.w3.weight')
    cases['missing entry'] = ('no_head.pth', ['--ema'], "no 'model_ema' entry")
    (tmp / 'pretrain.pth').write_bytes(published.sources['pt'].read_bytes())
    cases['encoder as classifier tag'] = ('pretrain.pth', [], 'arm_mamba_base.arm_in1k is a fine-tuned classifier')
    return cases


@pytest.mark.parametrize('case', ['truncated pth', 'truncated safetensors', 'random bytes', 'pickle of a list',
                                  'dict without tensors', 'disallowed global', 'another size', 'missing head',
                                  'missing layer key', 'missing entry', 'encoder as classifier tag'])
def test_bad_input_one_line_error_nothing_written(case, published, tmp_path, capsys):
    src, extra, words = _bad_inputs(tmp_path, published)[case]
    src = tmp_path / src
    out = tmp_path / 'hub' / 'out'
    before = set(tmp_path.rglob('*'))
    rc, _, err = _run(['convert', src, out, '--model', 'arm_mamba_base.arm_in1k', *SMALL_KWARGS, *extra], capsys)
    assert rc == 2
    assert err.count('\n') == 1 and err.startswith('timm-arm-hub: ') and words in err, err
    assert err.startswith(f'timm-arm-hub: {src}: '), err
    assert not out.exists() and set(tmp_path.rglob('*')) == before  # not even a partial folder
    print(err, file=sys.__stderr__)


def test_wrong_resolution_tag_is_refused(tmp_path, capsys):
    src = tmp_path / 'ft384.pth'
    torch.save({'model': to_reference_layout(_classifier(img_size=48).state_dict())}, src)
    rc, _, err = _run(['convert', src, tmp_path / 'out', '--model', 'arm_mamba_tiny',
                       '--model-kwargs', 'embed_dim=32', 'depth=2', 'patch_size=8', 'img_size=32'], capsys)
    assert rc == 2 and 'a conversion does not resample' in err
    assert not (tmp_path / 'out').exists()


def test_tag_follows_the_checkpoint_resolution():
    """A 384 px huge checkpoint becomes arm_in1k_384 without a tag, and is refused as the 224 px arm_in1k."""
    from timm_arm.hub.export import _build, _resolve_name
    from timm_arm.hub.source import CheckpointInfo
    info = CheckpointInfo(layout='reference', embed_dim=1536, depth=24, patch_size=16, in_chans=3, grid=(24, 24),
                          class_token=True, num_directions=4, num_classes=1000)
    assert _resolve_name('arm_mamba_huge', info, Path('h.pth'))[0] == 'arm_mamba_huge.arm_in1k_384'
    name, cfg = _resolve_name('arm_mamba_huge.arm_in1k', info, Path('h.pth'))
    with pytest.raises(HubError, match='is for 384 px .* but arm_mamba_huge.arm_in1k is for 224 px'):
        _build(name, cfg, info, {}, Path('h.pth'))
    info.grid, info.num_directions, info.class_token, info.num_classes = (12, 12), 1, False, None
    assert _resolve_name('arm_mamba_huge', info, Path('h.pth'))[0] == 'arm_mamba_huge.arm_in1k_ar'
    with pytest.raises(HubError, match='not an ARM model'):
        _resolve_name('resnet50', info, Path('h.pth'))


def test_module_entry_point_reports_errors(tmp_path, monkeypatch, capsys):
    """`python -m timm_arm.hub` (run in-process: a fresh interpreter costs seconds of imports)."""
    (tmp_path / 'random.pth').write_bytes(random.Random(1).randbytes(1000))
    monkeypatch.setattr(sys, 'argv', ['timm-arm-hub', 'convert', str(tmp_path / 'random.pth'), str(tmp_path / 'out'),
                                      '--model', 'arm_mamba_base'])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module('timm_arm.hub', run_name='__main__')
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f'timm-arm-hub: {tmp_path / "random.pth"}: not a PyTorch checkpoint')
    assert err.count('\n') == 1 and not (tmp_path / 'out').exists()


class _NotFound(RepositoryNotFoundError):
    def __init__(self):
        Exception.__init__(self, '404 repository not found')


class FakeHub:
    """Stands in for the Hub *service* (HfApi's methods we call): keeps the files of each repo and lists them
    as the Hub does, *.safetensors through LFS (sha256), the rest as git blobs."""

    def __init__(self, offline: bool = False):
        self.repos, self.calls, self.offline = {}, [], offline

    def list_repo_tree(self, repo_id, path_in_repo=None, *, recursive=False, revision=None, **kwargs):
        self.calls.append(('list_repo_tree', repo_id))
        if self.offline:
            raise ConnectionError('no network')
        if repo_id not in self.repos:
            raise _NotFound()
        return list(self.repos[repo_id].values())

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        self.calls.append(('create_repo', repo_id))
        self.repos.setdefault(repo_id, {})

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kwargs):
        paths = sorted(op.path_in_repo for op in operations)
        self.calls.append(('create_commit', repo_id, paths))
        for op in operations:
            data = Path(op.path_or_fileobj).read_bytes()
            if op.path_in_repo.endswith('.safetensors'):
                pointer = f'version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}'
                entry = RepoFile(path=op.path_in_repo, size=len(data), oid=hashlib.sha1(pointer.encode()).hexdigest(),
                                 lfs={'size': len(data), 'oid': hashlib.sha256(data).hexdigest(), 'pointerSize': 134})
            else:
                entry = RepoFile(path=op.path_in_repo, size=len(data),
                                 oid=hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest())
            self.repos[repo_id][op.path_in_repo] = entry
        return SimpleNamespace(commit_url=f'https://huggingface.co/{repo_id}/commit/0123')

    def uploads(self):
        return [c[2] for c in self.calls if c[0] == 'create_commit']


def test_publish_uploads_only_changes(published, tmp_path):
    folder = tmp_path / 'folder'
    folder.mkdir()
    for name in FILES:
        (folder / name).write_bytes((published.out['ft'] / name).read_bytes())
    hub, repo = FakeHub(), f'{HUB_ORG}/arm_mamba_base.arm_in1k'
    quiet = dict(log=lambda msg: None)

    assert publish(folder, repo, api=hub, dry_run=True, **quiet) == FILES  # new repo: everything, nothing sent
    assert hub.uploads() == [] and ('create_repo', repo) not in hub.calls
    assert publish(folder, repo, api=hub, **quiet) == FILES
    assert hub.uploads() == [FILES] and ('create_repo', repo) in hub.calls
    assert publish(folder, repo, api=hub, **quiet) == []  # unchanged: no commit at all
    assert publish(folder, repo, api=hub, dry_run=True, **quiet) == []
    assert hub.uploads() == [FILES]
    (folder / 'README.md').write_text((folder / 'README.md').read_text() + '\nMore.\n')
    assert publish(folder, repo, api=hub, dry_run=True, **quiet) == ['README.md']
    assert publish(folder, repo, api=hub, **quiet) == ['README.md']
    assert hub.uploads() == [FILES, ['README.md']]

    # without network a dry run still lists what would go up; a real publish stops with one line
    offline = FakeHub(offline=True)
    assert publish(folder, repo, api=offline, dry_run=True, **quiet) == FILES
    with pytest.raises(HubError, match='cannot read the Hub repo'):
        publish(folder, repo, api=offline, **quiet)
    # only safetensors are published
    (folder / 'pytorch_model.bin').write_bytes(b'pickle')
    with pytest.raises(HubError, match='refusing to publish pickled files'):
        publish(folder, repo, api=hub, **quiet)
    assert hub.uploads() == [FILES, ['README.md']]


def test_publish_cli_dry_run(published, monkeypatch, capsys):
    hub = FakeHub()
    monkeypatch.setattr('timm_arm.hub.upload.HfApi', lambda **kwargs: hub)
    rc, out, err = _run(['publish', published.out['ft'], f'{HUB_ORG}/arm_mamba_base.arm_in1k', '--dry-run'], capsys)
    assert rc == 0, err
    assert 'would upload 3 file(s)' in out and all(f'new       {name}' in out for name in FILES)
    assert hub.uploads() == []
    rc, _, err = _run(['publish', published.out['ft'], 'no-owner'], capsys)
    assert rc == 2 and err == 'timm-arm-hub: no-owner: repo id must be <owner>/<name>\n'
