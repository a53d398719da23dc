""" timm-arm-run: runs a timm script (validate.py, benchmark.py, ...) as __main__ with the ARM models registered. """
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_arm.run import main

ROOT = Path(__file__).resolve().parent.parent

STAND_IN = '''
import sys
import timm
import torch

assert __name__ == '__main__'
model = timm.create_model('arm_mamba_tiny', embed_dim=32, depth=1, img_size=32, patch_size=8, num_classes=5)
out = model(torch.randn(2, 3, 32, 32))
print('argv', sys.argv[1:], 'out', tuple(out.shape), 'script', sys.argv[0].endswith('stand_in.py'))
'''

TRAIN_STAND_IN = '''
import argparse
from pathlib import Path
parser = argparse.ArgumentParser()
parser.add_argument('-c', '--config', default='')
parser.add_argument('--model', default='resnet50')
parser.add_argument('--pretrained', action='store_true')
parser.add_argument('--pretrained-path', default=None)
parser.add_argument('--epochs', type=int, default=300)
parser.add_argument('--device-modules', nargs='+', default=None)
Path(__file__).with_name('ran').write_text('yes')
'''


def test_fresh_interpreter_registers_models(tmp_path):
    """In a new interpreter (nothing imported yet), the stand-in script's create_model('arm_mamba_tiny') works."""
    script = tmp_path / 'stand_in.py'
    script.write_text(STAND_IN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run(
        [sys.executable, '-m', 'timm_arm.run', str(script), '--flag', 'value'],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "argv ['--flag', 'value'] out (2, 5) script True" in result.stdout


def test_module_form(tmp_path, monkeypatch, capsys):
    (tmp_path / 'stand_in_module.py').write_text(STAND_IN.replace("sys.argv[0].endswith('stand_in.py')", 'True'))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, 'argv', ['timm-arm-run'])
    main(['-m', 'stand_in_module', '--x=1'])
    assert "argv ['--x=1'] out (2, 5)" in capsys.readouterr().out


def test_usage_and_missing_script(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['timm-arm-run'])
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match='no such script'):
        main(['does_not_exist.py'])


@pytest.mark.parametrize('recipe, extra, error', [
    ('model: arm_mamba_tiny\ndevice_modules: [timm_arm]\nepochs: 3\n', [], None),
    ('model: arm_mamba_tiny\ndevice_modules: [timm_arm]\nepoch: 3\n', [], "unknown key 'epoch'"),
    # keys are checked against the train.py being run: this stand-in has no --layer-decay
    ('model: arm_mamba_tiny\ndevice_modules: [timm_arm]\nlayer_decay: 0.65\n', [], "unknown key 'layer_decay'"),
    ('model: arm_mamba_tiny\ndevice_modules: [timm_arm]\npretrained: true\n', [], 'has no published weights'),
    ('model: arm_mamba_tiny\ndevice_modules: [timm_arm]\npretrained: true\n', ['--pretrained-path', 'x.pt'], None),
])
def test_train_recipe_checked_before_run(tmp_path, monkeypatch, recipe, extra, error):
    train = tmp_path / 'train.py'
    train.write_text(TRAIN_STAND_IN)
    config = tmp_path / 'recipe.yaml'
    config.write_text(recipe)
    monkeypatch.setattr(sys, 'argv', ['timm-arm-run'])
    argv = [str(train), '--config', str(config), *extra]
    if error is None:
        main(argv)
        assert (tmp_path / 'ran').exists()
    else:
        with pytest.raises(SystemExit, match=error):
            main(argv)
        assert not (tmp_path / 'ran').exists()
        main(['--no-check', *argv])
        assert (tmp_path / 'ran').exists()


def test_unavailable_hub_weights_refused_before_run(tmp_path, monkeypatch):
    """A recipe that starts from a registered tag whose weights are neither cached nor fetchable (offline, empty
    cache): an error naming the repo, why, and --pretrained-path, before train.py runs; cached weights pass."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(sys, 'argv', ['timm-arm-run'])
    train = tmp_path / 'train.py'
    train.write_text(TRAIN_STAND_IN)
    config = tmp_path / 'recipe.yaml'
    config.write_text('model: arm_mamba_tiny_patch4_32.arm_cifar10_ar\ndevice_modules: [timm_arm]\npretrained: true\n')
    with pytest.raises(SystemExit) as e:
        main([str(train), '--config', str(config)])
    for text in ('timm-arm/arm_mamba_tiny_patch4_32.arm_cifar10_ar', 'offline (HF_HUB_OFFLINE=1)',
                 'Pass --pretrained-path FILE'):
        assert text in str(e.value.code), text
    assert not (tmp_path / 'ran').exists()
    # the same weights in the local Hugging Face cache (as `timm-arm-hub cache` puts them): train.py runs
    snapshot = tmp_path / 'hub' / 'models--timm-arm--arm_mamba_tiny_patch4_32.arm_cifar10_ar' / 'snapshots' / 'abc'
    snapshot.mkdir(parents=True)
    (snapshot / 'model.safetensors').write_bytes(b'')
    (snapshot.parent.parent / 'refs').mkdir()
    (snapshot.parent.parent / 'refs' / 'main').write_text('abc')
    main([str(train), '--config', str(config)])
    assert (tmp_path / 'ran').exists()


DEVICE_STAND_IN = """
import sys
from pathlib import Path
Path(__file__).with_name('argv').write_text(' '.join(sys.argv[1:]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason='the --device cpu default applies without a GPU')
def test_scripts_by_name_and_cpu_device(tmp_path, monkeypatch, capsys):
    """TIMM_SCRIPTS finds timm's scripts by name; without a GPU they get --device cpu unless a device is chosen."""
    (tmp_path / 'validate.py').write_text(DEVICE_STAND_IN)
    monkeypatch.setattr(sys, 'argv', ['timm-arm-run'])
    monkeypatch.chdir(ROOT)  # the project folder: no validate.py here
    with pytest.raises(SystemExit, match='set TIMM_SCRIPTS to a checkout'):
        main(['validate.py'])
    monkeypatch.setenv('TIMM_SCRIPTS', str(tmp_path))
    main(['validate.py', '--model', 'arm_mamba_tiny'])
    assert (tmp_path / 'argv').read_text() == '--model arm_mamba_tiny --device cpu'
    assert 'adding --device cpu' in capsys.readouterr().err
    main(['validate.py', '--device', 'cuda:1'])
    assert (tmp_path / 'argv').read_text() == '--device cuda:1'
    (tmp_path / 'other.py').write_text(DEVICE_STAND_IN)  # not one of timm's device scripts: left alone
    main(['other.py', '--x'])
    assert (tmp_path / 'argv').read_text() == '--x'
