"""timm-arm-pretrain: resume exactness, crash-safe checkpoints, export into the classifier, logs, bad input."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import timm

from timm_arm.pretrain.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from timm_arm.pretrain.cli import main, parse_args
from timm_arm.pretrain.train import train

MODEL = ['--model', 'arm_mamba_tiny', '--model-kwargs', 'embed_dim=32', 'depth=2', 'patch_size=8', 'cluster_size=2',
         'decoder_embed_dim=32', 'decoder_num_heads=2', '--img-size', '32']
FAST = ['--amp-dtype', 'float32', '--workers', '0', '--no-progress', '--warmup-epochs', '1', '--blr', '0.02',
        '--log-interval', '1']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for c in ('cat', 'dog'):
        os.makedirs(root / c)
        for i in range(12):
            img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
            img.save(root / c / f'{i}.{"png" if i % 2 else "jpg"}')
    return str(root)


def _args(data, out, *extra):
    return parse_args(['--data-dir', data, '--output', str(out), *MODEL, *FAST, *extra])


def _weights(path):
    return load_checkpoint(path)['model']


@pytest.mark.parametrize('in_memory', ['on', 'off'])
def test_resume_equals_uninterrupted(image_folder, tmp_path, in_memory):
    torch.set_num_threads(1)
    common = ['-b', '8', '--grad-accum-steps', '2', '--epochs', '2', '--ckpt-interval', '100',
              '--in-memory', in_memory]
    full = train(_args(image_folder, tmp_path / 'full', *common))
    # 24 images / 8 = 3 updates per epoch; stop mid-epoch 1 (after 4 updates), then resume to the end
    part = train(_args(image_folder, tmp_path / 'part', *common, '--max-steps', '4'))
    assert part.endswith('checkpoint-00000004.pth')
    state = load_checkpoint(part)
    assert (state['epoch'], state['step_in_epoch'], state['global_step']) == (1, 1, 4)
    resumed = train(_args(image_folder, tmp_path / 'part', *common))  # automatic resume from the output folder
    assert os.path.basename(resumed) == os.path.basename(full) == 'checkpoint-00000006.pth'
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = load_checkpoint(full), load_checkpoint(resumed)
    for pa, pb in zip(sa['optimizer']['state'].values(), sb['optimizer']['state'].values()):
        assert torch.equal(pa['exp_avg_sq'], pb['exp_avg_sq'])
    assert not torch.equal(a['encoder.blocks.0.mixer.x_proj_weight'],
                           _weights(part)['encoder.blocks.0.mixer.x_proj_weight'])  # it did train further
    # logs: one JSON line per update, with the required fields; the resumed run appended steps 5, 6
    steps = [json.loads(line) for line in open(tmp_path / 'part' / 'log.jsonl')]
    assert [r['step'] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {'step', 'epoch', 'loss', 'lr', 'img_per_s'} <= steps[-1].keys()
    assert steps[0]['lr'] == 0.0 and steps[2]['lr'] > 0  # warm-up from 0 over the first epoch


def test_overfit_through_the_cli(image_folder, tmp_path):
    """A batch the size of the data set, many epochs: the logged loss falls."""
    torch.set_num_threads(1)
    args = ['-b', '24', '--epochs', '30', '--warmup-epochs', '0', '--blr', '0.03', '--weight-decay', '0',
            '--ckpt-interval', '1000', '--no-export', '--keep-last', '1']
    assert main(['--data-dir', image_folder, '--output', str(tmp_path), *MODEL, *FAST, *args]) == 0
    losses = [json.loads(line)['loss'] for line in open(tmp_path / 'log.jsonl')]
    assert len(losses) == 30 and min(losses[-3:]) < 0.8 * losses[0], losses
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path)] == ['checkpoint-00000030.pth']  # keep_last


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    module = os.path.join(REPO, 'timm_arm', 'pretrain', 'checkpoint.py')
    state = {'model': {'w': torch.arange(10.)}, 'global_step': 1}
    save_checkpoint(state, str(tmp_path), 1)
    script = textwrap.dedent(f"""
        import importlib.util, os, signal, torch
        # load checkpoint.py alone (no timm import): a fast child process
        spec = importlib.util.spec_from_file_location('ckpt', {module!r})
        ckpt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ckpt)
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b'PK' + b'x' * 4096)  # half a file ...
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # ... then the process dies
        torch.save = dying_save
        ckpt.save_checkpoint({{'model': {{'w': torch.zeros(10)}}, 'global_step': 2}}, {str(tmp_path)!r}, 2)
    """)
    proc = subprocess.run([sys.executable, '-c', script])
    assert proc.returncode == -9
    assert any(f.endswith('.tmp') for f in os.listdir(tmp_path))  # the torn write exists, but under a temp name
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ['checkpoint-00000001.pth']
    path = latest_checkpoint(str(tmp_path))
    assert torch.equal(load_checkpoint(path)['model']['w'], torch.arange(10.))
    # a torn file under the final name (e.g. copied by hand) is skipped by automatic resume
    with open(tmp_path / 'checkpoint-00000003.pth', 'wb') as f:
        f.write(b'garbage')
    assert latest_checkpoint(str(tmp_path)) == path


def test_export_loads_into_classifier(image_folder, tmp_path):
    torch.set_num_threads(1)
    assert main(['--data-dir', image_folder, '--output', str(tmp_path), *MODEL, *FAST,
                 '-b', '8', '--epochs', '1', '--ckpt-interval', '1000']) == 0
    export = tmp_path / 'export'
    assert sorted(os.listdir(export)) == ['config.json', 'model.safetensors']
    config = json.load(open(export / 'config.json'))
    assert config['architecture'] == 'arm_mamba_tiny' and config['num_classes'] == 0
    # the shape, not the 1-direction pretraining form: timm builds the classifier from it
    assert {k: config['model_args'][k] for k in ('embed_dim', 'depth', 'patch_size', 'img_size')} == {
        'embed_dim': 32, 'depth': 2, 'patch_size': [8, 8], 'img_size': [32, 32]}
    assert not {'num_directions', 'class_token', 'pos_embed'} & set(config['model_args'])
    assert config['model_args'].get('global_pool', 'avg') == 'avg'
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32] and config['pretrained_cfg']['crop_pct'] == 1.0
    assert config['pretraining']['cluster_size'] == [2, 2]
    encoder = {k[len('encoder.'):]: v for k, v in _weights(latest_checkpoint(str(tmp_path))).items()
               if k.startswith('encoder.')}

    classifier = timm.create_model(
        'arm_mamba_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(export / 'model.safetensors')),
        num_classes=10, embed_dim=32, depth=2, patch_size=8, img_size=48)
    sd = classifier.state_dict()
    assert classifier.num_directions == 4 and sd['head.fc.weight'].shape == (10, 32)
    for name in ('conv_weight', 'x_proj_weight', 'dt_proj_weight', 'dt_proj_bias', 'A_log', 'D'):
        k = f'blocks.1.mixer.{name}'
        assert encoder[k].shape[0] == 1
        for d in range(4):
            assert torch.equal(sd[k][d], encoder[k][0]), (k, d)
    assert torch.equal(sd['blocks.0.mixer.in_proj.weight'], encoder['blocks.0.mixer.in_proj.weight'])
    assert torch.equal(sd['patch_embed.proj.weight'], encoder['patch_embed.proj.weight'])
    assert sd['pos_embed'].shape == (1, 6 * 6 + 1, 32)  # 4x4 pretraining grid resampled to 6x6 + middle cls
    assert torch.all(sd['pos_embed'][0, 18] == 0)
    assert classifier(torch.randn(1, 3, 48, 48)).shape == (1, 10)

    # timm-arm-hub convert of the training checkpoint by itself: the model and the encoder's shape from the run's
    # args.yaml (its decoder settings left out), the same weights as the export
    from timm_arm.hub.export import convert
    convert(latest_checkpoint(str(tmp_path)), tmp_path / 'hub', None, check=False, log=lambda msg: None)
    converted = load_file(tmp_path / 'hub' / 'model.safetensors')
    exported = load_file(export / 'model.safetensors')
    assert converted.keys() == exported.keys() and all(torch.equal(converted[k], exported[k]) for k in exported)
    assert json.load(open(tmp_path / 'hub' / 'config.json'))['model_args']['embed_dim'] == 32

    # the --export command re-exports any checkpoint; local-dir: builds the 4-direction classifier from config
    again = tmp_path / 'again'
    assert main(['--output', str(tmp_path), '--export', str(again)]) == 0
    local = timm.create_model(f'local-dir:{again}', pretrained=True)
    assert local.num_directions == 4 and local.num_classes == 0
    assert torch.equal(local.state_dict()['blocks.1.mixer.A_log'][3], encoder['blocks.1.mixer.A_log'][0])


def test_in_memory_auto_falls_back_to_workers(tmp_path, caplog):
    """Images of mixed sizes cannot be held as one tensor: --in-memory auto trains with worker processes."""
    mixed = tmp_path / 'mixed'
    os.makedirs(mixed / 'a')
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (36 + i % 2 * 8, 40, 3), dtype=np.uint8)).save(mixed / 'a' / f'{i}.png')
    caplog.set_level('INFO')
    out = tmp_path / 'out'
    assert main(['--data-dir', str(mixed), '--output', str(out), *MODEL, *FAST, '-b', '8', '--epochs', '1']) == 0
    assert 'Images decoded by worker processes (--in-memory auto)' in caplog.text
    assert (out / 'export' / 'model.safetensors').is_file()


def test_visualize_writes_the_prediction_grid(image_folder, tmp_path):
    from timm_arm.pretrain.visualize import predict_clusters
    out = tmp_path / 'run'
    assert main(['--data-dir', image_folder, '--output', str(out), *MODEL, *FAST, '-b', '8', '--max-steps', '2']) == 0
    png = tmp_path / 'grid.png'
    assert main(['--output', str(out), '--visualize', str(png), '--data-dir', image_folder, '--num-images', '6']) == 0
    # 6 (input, prediction) pairs, 4 pairs a row: 2 rows; 32 px images shown at 128 px, 2 px padding
    assert Image.open(png).size == (8 * 128 + 9 * 2, 2 * 128 + 3 * 2)

    # the predictions are the model's: back in normalised-pixel space (true patch statistics) they are its output
    state = load_checkpoint(latest_checkpoint(str(out)))
    from timm_arm.models.arm_pretrain import create_pretrainer
    model = create_pretrainer(state['model_name'], img_size=state['img_size'], **state['model_kwargs']).eval()
    model.load_state_dict(state['model'])
    images = torch.randn(3, 3, 32, 32)
    shown = model.patchify(predict_clusters(model, images))
    true = model.patchify(images)
    first, rest = model.order[:model.cluster_len], model.order[model.cluster_len:]
    assert torch.equal(shown[:, first], true[:, first])  # the first cluster is the input
    mean, var = true[:, rest].mean(-1, keepdim=True), true[:, rest].var(-1, keepdim=True)
    with torch.no_grad():
        pred, _ = model.forward_pred(images)
    assert torch.allclose((shown[:, rest] - mean) / (var + model.norm_pix_eps).sqrt(), pred, atol=1e-4)
    assert main(['--output', str(tmp_path / 'none'), '--visualize', str(png), '--data-dir', image_folder]) == 2


@pytest.mark.parametrize('in_memory', ['on', 'off'])
def test_sigterm_checkpoints_and_resumes_exactly(image_folder, tmp_path, in_memory):
    """SIGTERM to the whole process group (as schedulers send it), data workers included: a checkpoint at the next
    step boundary, exit 143; re-running the command ends with the weights of an uninterrupted run."""
    torch.set_num_threads(1)  # as the child process (OMP_NUM_THREADS=1): the same float sums
    argv = ['--data-dir', image_folder, *MODEL, *FAST, '-b', '8', '--epochs', '40', '--ckpt-interval', '1000',
            '--keep-last', '1', '--no-export', '--in-memory', in_memory]
    if in_memory == 'off':
        argv[argv.index('--workers') + 1] = '2'  # worker processes that receive the signal too
    full = tmp_path / 'full'
    assert main([*argv, '--output', str(full)]) == 0
    run = tmp_path / 'run'
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-m', 'timm_arm.pretrain', *argv, '--output', str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = run / 'log.jsonl'
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count('\n') >= 2) and time.time() < deadline:
        time.sleep(0.05)  # metrics from the first step on: wait for two logged steps
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert 'SIGTERM received' in output and 'stopped by SIGTERM' in output and 'Traceback' not in output
    stopped = latest_checkpoint(str(run))
    step = load_checkpoint(stopped)['global_step']
    assert 2 <= step < 120 and not (run / 'export').exists()
    assert main([*argv, '--output', str(run)]) == 0  # the same command resumes
    a, b = _weights(latest_checkpoint(str(full))), _weights(latest_checkpoint(str(run)))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_steps_exports_and_time_checkpoints(image_folder, tmp_path, caplog):
    caplog.set_level('INFO')
    out = tmp_path / 'out'
    assert main(['--data-dir', image_folder, '--output', str(out), *MODEL, *FAST, '-b', '8', '--epochs', '5',
                 '--max-steps', '4', '--ckpt-interval', '1000', '--ckpt-minutes', '1e-9', '--keep-last', '10']) == 0
    # a checkpoint after every step: the time interval (a nanosecond here) is due at each step boundary
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == [
        f'checkpoint-{s:08d}.pth' for s in (1, 2, 3, 4)]
    assert (out / 'export' / 'model.safetensors').is_file()  # --max-steps ends like the last epoch: exported
    summary = caplog.text[caplog.text.index('Pretraining stopped by --max-steps at update 4 of 15'):]
    for text in (f'checkpoint: {out}/checkpoint-00000004.pth', f'export:     {out}/export/model.safetensors',
                 f"timm.create_model('local-dir:{out}/export', pretrained=True, num_classes=N)"):
        assert text in summary, text


def test_quick_on_cpu_run_and_max_steps(tmp_path, caplog):
    """Without a GPU, --quick-on-cpu N: N updates at batch 64 over N x 64 of the images, one epoch, in float32;
    --max-steps still stops it earlier, and the run ends like any other (checkpoint + export)."""
    caplog.set_level('INFO')
    rng = np.random.default_rng(1)
    data = tmp_path / 'images' / 'one'
    data.mkdir(parents=True)
    for i in range(200):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f'{i}.png')
    common = ['--data-dir', str(tmp_path / 'images'), *MODEL, *FAST, '--amp-dtype', 'bfloat16', '-b', '8',
              '--epochs', '7', '--ckpt-interval', '1000', '--device', 'cpu', '--quick-on-cpu', '3']
    assert main([*common, '--output', str(tmp_path / 'full')]) == 0
    assert 'a quick run of 3 updates (batch 64, 192 images, one epoch)' in caplog.text
    assert 'global batch 64' in caplog.text and '3 updates/epoch, 3 updates in all, amp float32' in caplog.text
    assert [json.loads(line)['step'] for line in open(tmp_path / 'full' / 'log.jsonl')][-1] == 3
    caplog.clear()
    assert main([*common, '--output', str(tmp_path / 'full')]) == 0  # again: resumes at the end, runs nothing
    assert 'Pretraining finished (3 updates, 1 epochs): nothing left to run.' in caplog.text
    caplog.clear()
    assert main([*common, '--output', str(tmp_path / 'capped'), '--max-steps', '1']) == 0
    assert '--max-steps 1 stops it earlier' in caplog.text and '1 updates in all' in caplog.text
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / 'capped'))] == ['checkpoint-00000001.pth']
    assert (tmp_path / 'capped' / 'export' / 'model.safetensors').is_file()


def test_keep_last_never_keeps_an_unreadable_checkpoint(image_folder, tmp_path):
    """The newest checkpoint torn: resume falls back to the one before, and pruning keeps readable ones only."""
    out = tmp_path / 'out'
    argv = ['--data-dir', image_folder, '--output', str(out), *MODEL, *FAST, '-b', '8', '--epochs', '3',
            '--ckpt-interval', '1', '--keep-last', '2', '--no-export']
    assert main([*argv, '--max-steps', '2']) == 0
    newest = out / 'checkpoint-00000002.pth'
    with open(newest, 'r+b') as f:
        f.truncate(newest.stat().st_size // 3)
    (out / 'checkpoint-00000009.pth').write_bytes(b'not a checkpoint')  # a stray unreadable one above them all
    assert main([*argv, '--max-steps', '3']) == 0
    kept = list_checkpoints(str(out))
    assert [os.path.basename(p) for p in kept] == ['checkpoint-00000002.pth', 'checkpoint-00000003.pth']
    assert all(load_checkpoint(p)['global_step'] == s for p, s in zip(kept, (2, 3)))
    assert (out / 'checkpoint-00000009.pth.unreadable').read_bytes() == b'not a checkpoint'  # set aside, not lost


def test_download_when_no_data_dir(tmp_path, capsys, monkeypatch):
    """No --data-dir: the recipe's dataset is fetched into --cache-dir; a failed download is one clear line and
    nothing is written (the download URL points at a closed local port here: no network needed)."""
    import torchvision
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'url', 'http://127.0.0.1:9/cifar-10-python.tar.gz')
    out = tmp_path / 'out'
    _fails(capsys, ['-c', 'arm_mamba_tiny_patch4_32_cifar10', '--output', str(out), '--cache-dir',
                    str(tmp_path / 'cache'), '--device', 'cpu'], f"Cannot open dataset torch/cifar10 at '{tmp_path}")
    assert not out.exists()


def test_config_file(image_folder, tmp_path):
    cfg = tmp_path / 'r.yaml'
    cfg.write_text('batch_size: 16\nepochs: 7\nmodel_kwargs: {cluster_size: 2}\nblr: 1.0e-3\n')
    args = parse_args(['--config', str(cfg), '--epochs', '3'])
    assert (args.batch_size, args.epochs, args.model_kwargs, args.blr) == (16, 3, {'cluster_size': 2}, 1e-3)
    cfg.write_text('batch_sise: 16\n')
    with pytest.raises(SystemExit):
        parse_args(['--config', str(cfg)])
    for recipe in os.listdir(os.path.join(REPO, 'recipes', 'pretrain')):
        parse_args(['--config', os.path.join(REPO, 'recipes', 'pretrain', recipe)])


def _fails(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert err.count(match) == 1 and len(err.strip().splitlines()) == 1, err  # one line, printed once


def test_bad_config_files(tmp_path, capsys):
    """Config values are checked as the command line checks them; missing / malformed files named; one line each."""
    cases = {
        'amp_dtype: fp16\n': "amp_dtype: invalid choice 'fp16' (choose from 'bfloat16', 'float16', 'float32')",
        'epochs: 100.0\n': 'epochs must be an integer, got 100.0',
        'no_export: 1\n': 'no_export must be true or false, got 1',
        'epochs: [1\n': 'is not valid YAML (line 2, column 1)',
        '- a list\n': 'must map flag names to values, not hold a list',
        'epochz: 3\n': 'unknown keys in',
    }
    for i, (text, message) in enumerate(cases.items()):
        config = tmp_path / f'{i}.yaml'
        config.write_text(text)
        with pytest.raises(SystemExit):
            parse_args(['-c', str(config)])
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (text, err)
    with pytest.raises(SystemExit):
        parse_args(['-c', str(tmp_path / 'missing.yaml')])
    assert 'missing.yaml: No such file or directory' in capsys.readouterr().err


def test_bad_input(image_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'out'
    base = ['--output', str(out), *MODEL, *FAST, '-b', '8', '--epochs', '1']
    _fails(capsys, ['--data-dir', str(tmp_path / 'nope'), *base], 'does not exist')
    os.makedirs(tmp_path / 'empty' / 'a')
    _fails(capsys, ['--data-dir', str(tmp_path / 'empty'), *base], 'holds no images')
    os.makedirs(tmp_path / 'broken' / 'a')
    for i in range(3):
        (tmp_path / 'broken' / 'a' / f'{i}.jpg').write_bytes(b'not a jpeg')
    _fails(capsys, ['--data-dir', str(tmp_path / 'broken'), *base], 'Cannot decode image')
    _fails(capsys, ['--data-dir', image_folder, *base, '--img-size', '40'], 'must be divisible by patch size')
    _fails(capsys, ['--data-dir', image_folder, *base, '-b', '64'], 'less than one global batch')
    _fails(capsys, ['--data-dir', image_folder, *base, '--in-memory', 'on', '--in-memory-max-gb', '1e-5'],
           'over the in-memory budget')
    mixed = tmp_path / 'mixed'
    os.makedirs(mixed / 'a')
    for i, shape in enumerate([(32, 32, 3)] * 5 + [(40, 32, 3)] + [(32, 32, 3)] * 4):
        Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(mixed / 'a' / f'{i}.png')
    _fails(capsys, ['--data-dir', str(mixed), *base, '--in-memory', 'on'], '5.png is 32x40 px, the first image 32x32')
    monkeypatch.setenv('WORLD_SIZE', '4')
    _fails(capsys, ['--data-dir', image_folder, *base, '-b', '2'], 'smaller than the world size 4')
    monkeypatch.delenv('WORLD_SIZE')
    assert not out.exists()  # nothing written by any of these

    # a resume file from another model: clear error, the output folder untouched
    assert main(['--data-dir', image_folder, *base, '--max-steps', '1']) == 0
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    other = [a if a != 'depth=2' else 'depth=3' for a in base]
    _fails(capsys, ['--data-dir', image_folder, *other], 'is from another model')
    _fails(capsys, ['--data-dir', image_folder, *base, '--no-resume'], 'already holds checkpoints')
    _fails(capsys, ['--data-dir', image_folder, *base, '--resume', str(tmp_path / 'missing.pth')], 'no such file')
    (tmp_path / 'zero.pth').write_bytes(b'')
    _fails(capsys, ['--data-dir', image_folder, *base, '--resume', str(tmp_path / 'zero.pth')],
           'zero.pth: the file is empty (0 bytes)')
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint at all' * 8)
    _fails(capsys, ['--data-dir', image_folder, *base, '--resume', str(tmp_path / 'garbage.pth')],
           "garbage.pth: not a PyTorch checkpoint: neither torch.save's zip format nor a readable pickle")
    good = latest_checkpoint(str(out))
    (tmp_path / 'torn.pth').write_bytes(open(good, 'rb').read()[:4096])
    _fails(capsys, ['--data-dir', image_folder, *base, '--resume', str(tmp_path / 'torn.pth')],
           'torn.pth: truncated or corrupt checkpoint (incomplete zip archive')
    if not torch.cuda.is_available():
        _fails(capsys, ['--data-dir', image_folder, *base, '--device', 'cuda'], 'no CUDA device is available here')
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before


@pytest.mark.slow
@pytest.mark.parametrize('in_memory', ['on', 'off'])
def test_ddp_two_processes_match_one(image_folder, tmp_path, in_memory):
    """torchrun (gloo, CPU): 1 and 2 processes at the same global batch log the same loss at every update."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    argv = ['-m', 'timm_arm.pretrain', '--data-dir', image_folder, *MODEL, *FAST, '-b', '8', '--epochs', '2',
            '--device', 'cpu', '--no-export', '--in-memory', in_memory]
    for n in (1, 2):
        subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(n),
                        *argv, '--output', str(tmp_path / str(n))], env=env, check=True, capture_output=True)
    a, b = ([json.loads(line)['loss'] for line in open(tmp_path / str(n) / 'log.jsonl')] for n in (1, 2))
    assert len(a) == len(b) == 6
    assert np.allclose(a, b, rtol=1e-5), (a, b)
