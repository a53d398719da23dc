""" The CIFAR-10 experiment's record: what `benchmarks/cifar10_repro.py report` makes of a run folder's state, the
pretraining log and train.py's summaries (the GPU steps themselves run on the device, not in CI). """
import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / 'benchmarks' / 'cifar10_repro.py'


@pytest.fixture(scope='module')
def repro():
    spec = importlib.util.spec_from_file_location('cifar10_repro', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_summary(path: Path, top1s):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'])
        writer.writeheader()
        for epoch, top1 in enumerate(top1s):
            writer.writerow(dict(epoch=epoch, train_loss=1., eval_loss=1., eval_top1=top1, eval_top5=99., lr=1e-3))


def _run_folder(tmp_path: Path, pretrain_card: str, finetune_card: str) -> Path:
    out = tmp_path / 'run'
    (out / 'pretrain').mkdir(parents=True)
    with (out / 'pretrain' / 'log.jsonl').open('w') as f:
        for step, (epoch, loss, rate) in enumerate([(0, 0.9, 9000.), (1, 0.6, 15000.), (2, 0.5, 14000.)]):
            f.write(json.dumps(dict(step=step * 50, epoch=epoch, loss=loss, img_per_s=rate)) + '\n')
    _write_summary(out / 'finetune' / 'arm_pretrained' / 'summary.csv', [50., 80., 86.5, 86.25])
    _write_summary(out / 'finetune' / 'scratch' / 'summary.csv', [30., 70., 82.75])
    state = {
        'pretrain': dict(seconds=[300.0, 60.0], card=pretrain_card, recipe='recipes/pretrain/p.yaml', commit='aaaa'),
        'finetune_arm_pretrained': dict(seconds=[600.0], card=finetune_card, concurrent=2, epochs=60,
                                        recipe='recipes/finetune/f.yaml', extra_args='', commit='bbbb'),
        'finetune_scratch': dict(seconds=[590.0], card=finetune_card, concurrent=2, epochs=60,
                                 recipe='recipes/finetune/s.yaml', extra_args='', commit='bbbb'),
        'finetune': dict(seconds=[612.0], card=finetune_card),
        'evaluate_arm_pretrained': dict(seconds=[12.0], top1=86.31, top5=99.5, card=finetune_card),
        'evaluate_scratch': dict(seconds=[12.0], top1=82.8, top5=99.1, card=finetune_card),
        'hub': dict(seconds=[24.0], local_dir_top1=86.31, hf_cache_top1=86.31, card=finetune_card),
    }
    (out / 'repro.json').write_text(json.dumps(state))
    return out


def _experiment(repro, out: Path):
    args = argparse.Namespace(out=str(out), data='', commit='cccc', results=str(out / 'results'),
                              results_name='cifar10_repro', timm_scripts='')
    return repro.Experiment(args)


def test_summary_of_a_run(repro, tmp_path):
    result, pretrain_log, curves = repro.summarize(_experiment(repro, _run_folder(tmp_path, 'H100', 'H100')))
    pre, scratch = result['runs']['arm_pretrained'], result['runs']['scratch']
    assert (pre['top1'], scratch['top1']) == (86.31, 82.8)
    assert result['gap_top1'] == pytest.approx(3.51)
    assert pre['pretrain_epochs'] == 3 and scratch['pretrain_epochs'] == 0  # from the log's last epoch index
    assert (pre['finetune_epochs'], pre['best_epoch_top1'], scratch['best_epoch_top1']) == (60, 86.5, 82.75)
    assert pre['pretrain_gpu_minutes'] == 6.0 and scratch['pretrain_gpu_minutes'] == 0.
    # pretraining (both of its calls) + the shared fine-tuning wall time + each evaluation + the Hub checks
    assert result['total_gpu_minutes'] == pytest.approx((360 + 612 + 12 + 12 + 24) / 60, abs=0.01)
    assert result['pretrain']['img_per_s'] == 14000.  # the median of the logged rates
    assert result['card'] == 'H100' and pre['card'] == 'H100'
    assert (pre['commit'], result['pretrain']['commit'], result['commit']) == ('bbbb', 'aaaa', 'cccc')
    assert len(curves['arm_pretrained']) == 4 and len(pretrain_log) == 3
    table = repro.markdown(result)
    assert '**82.80**' in table and '**86.31**' in table and 'ARM 3 ep' in table and 'FT 60 ep' in table


def test_summary_names_each_card(repro, tmp_path):
    result, _, _ = repro.summarize(_experiment(repro, _run_folder(tmp_path, 'H100', 'H200')))
    assert result['card'] == 'pretraining: H100; fine-tuning: H200'
    assert result['runs']['scratch']['card'] == 'H200'
