""" ARM on CIFAR-10, the whole experiment: AR pretraining, fine-tuning with timm's train.py, the same fine-tuning from
scratch, evaluation on the 10 000 test images, Hub folders checked through timm, results and pictures.

    python benchmarks/cifar10_repro.py --timm-scripts PATH/TO/pytorch-image-models --tarballs DIR --out OUT

--timm-scripts: a checkout of timm's repository (train.py, validate.py); --tarballs: a folder with train.tar.gz and
test.tar.gz (CIFAR-10 as JPEG folders), or --data DIR with train/ and test/ already extracted.

Steps, each skipped when its output exists, each resumable (the pretrainer and train.py resume from their last
checkpoint), so a limited GPU session can run them in several calls (--steps pretrain,visualize then --steps
finetune,evaluate,hub); `report` (no GPU) writes benchmarks/results/cifar10_repro.json, its Markdown table and the
PNG curves:
    pretrain    timm-arm-pretrain with recipes/pretrain/arm_mamba_tiny_patch4_32_cifar10.yaml
    visualize   next-cluster predictions of 8 test images (PNG)
    finetune    train.py: the pretrained encoder and the from-scratch control, side by side on one GPU
    evaluate    timm-arm-run validate.py on the final checkpoints (fp32, test split)
    hub         timm-arm-hub convert of the classifier and the encoder; validate.py through local-dir: and
                through the registered tag from an offline Hugging Face cache
    report      results JSON + Markdown + PNGs from the logs (matplotlib)
"""
import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_RECIPE = REPO / 'recipes' / 'pretrain' / 'arm_mamba_tiny_patch4_32_cifar10.yaml'
FINETUNE_RECIPES = {
    'arm_pretrained': REPO / 'recipes' / 'finetune' / 'arm_mamba_tiny_patch4_32_cifar10.yaml',
    'scratch': REPO / 'recipes' / 'finetune' / 'arm_mamba_tiny_patch4_32_cifar10_scratch.yaml',
}
ARCH = 'arm_mamba_tiny_patch4_32'
TAGS = {'classifier': f'{ARCH}.arm_cifar10', 'encoder': f'{ARCH}.arm_cifar10_ar'}
STEPS = ('pretrain', 'visualize', 'finetune', 'evaluate', 'hub', 'report')

# Published CIFAR-10 test top-1 (%) of small models, 32 px: (source, model, protocol, from scratch, pretrained)
ANCHORS = (
    ('IcarusWizard/MAE (README)', 'ViT-T 192 x 12, patch 2', 'MAE 2000 ep, FT 100 ep', 74.13, 89.77),
    ('yjh0410/MAE (README)', 'ViT-Nano 192 x 12, patch 2', 'MAE 400 ep, FT 50 ep', 77.7, 89.4),
    ('Gani et al. 2022', 'ViT 2.8 M, patch 4', 'self-sup 200 ep, FT 100 ep', 93.58, 96.41),
    ('Lee et al. 2021', 'SL-ViT, heavy aug', 'scratch 100 ep', 94.53, None),
    ('omihub777/ViT-CIFAR (README)', 'ViT 6.3 M', 'scratch 200 ep', 91.01, None),
    ('apapiu/mamba_small_bench (README)', 'Mamba stack, patch 4', 'scratch 100 ep', 85.0, None),
)


class Experiment:
    """Paths, the record of what ran (OUT/repro.json), and the commands."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.data = Path(args.data).resolve() if args.data else self.out / 'data'
        self.pretrain = self.out / 'pretrain'
        self.finetune = self.out / 'finetune'
        self.hub = self.out / 'hub'
        self.state_file = self.out / 'repro.json'
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))

    def save(self) -> None:
        tmp = self.state_file.with_suffix('.tmp')
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_file)

    def record(self, step: str, seconds: float, **info) -> None:
        entry = self.state.setdefault(step, {'seconds': []})
        entry['seconds'].append(round(seconds, 1))
        entry.update(info, commit=self.args.commit)
        self.save()

    def script(self, name: str) -> str:
        path = Path(self.args.timm_scripts) / name
        if not path.is_file():
            raise SystemExit(f'cifar10_repro: no {name} in --timm-scripts {self.args.timm_scripts}')
        return str(path)

    def run(self, cmd, log: Path, env=None) -> subprocess.Popen:
        print('+', ' '.join(str(c) for c in cmd), f'> {log}', flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, 'ab') as f:
            return subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env or self.env)


def _wait(proc: subprocess.Popen, log: Path) -> None:
    if proc.wait() != 0:
        tail = log.read_text(errors='replace').splitlines()[-25:]
        raise SystemExit(f'cifar10_repro: {proc.args[:4]} failed (exit {proc.returncode}); end of {log}:\n'
                         + '\n'.join(tail))


def _card() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'


def extract(exp: Experiment) -> None:
    if exp.args.data:
        return
    for split in ('train', 'test'):
        if not (exp.data / split).is_dir():
            tarball = Path(exp.args.tarballs) / f'{split}.tar.gz'
            print(f'extracting {tarball} -> {exp.data}', flush=True)
            exp.data.mkdir(parents=True, exist_ok=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(exp.data, filter='data')


def step_pretrain(exp: Experiment) -> None:
    if (exp.pretrain / 'export' / 'model.safetensors').is_file():
        return
    cmd = [sys.executable, '-m', 'timm_arm.pretrain', '-c', PRETRAIN_RECIPE, '--data-dir', exp.data / 'train',
           '--output', exp.pretrain, '--no-progress']
    if exp.args.pretrain_epochs:
        cmd += ['--epochs', exp.args.pretrain_epochs]
    cmd += shlex.split(exp.args.pretrain_args)
    start = time.perf_counter()
    log = exp.out / 'pretrain.log'
    _wait(exp.run(cmd, log), log)
    exp.record('pretrain', time.perf_counter() - start, card=_card(), recipe=str(PRETRAIN_RECIPE.relative_to(REPO)),
               epochs=exp.args.pretrain_epochs or None, extra_args=exp.args.pretrain_args)


def step_visualize(exp: Experiment) -> None:
    png = exp.out / 'predictions.png'
    if png.is_file():
        return
    cmd = [sys.executable, '-m', 'timm_arm.pretrain', '--output', exp.pretrain, '--visualize', png,
           '--data-dir', exp.data / 'test', '--num-images', '8']
    _wait(exp.run(cmd, exp.out / 'visualize.log'), exp.out / 'visualize.log')


def _epochs_done(run_dir: Path) -> int:
    summary = run_dir / 'summary.csv'
    return sum(1 for _ in csv.DictReader(summary.open())) if summary.is_file() else 0


def _epochs(exp: Experiment, name: str) -> int:
    if exp.args.finetune_epochs:
        return exp.args.finetune_epochs
    import yaml
    return int(yaml.safe_load(FINETUNE_RECIPES[name].read_text())['epochs'])


def step_finetune(exp: Experiment) -> None:
    train_py = exp.script('train.py')
    workers = max(1, (len(os.sched_getaffinity(0)) - 2) // len(FINETUNE_RECIPES))
    procs = {}
    start = time.perf_counter()
    for name, recipe in FINETUNE_RECIPES.items():
        run_dir = exp.finetune / name
        epochs = _epochs(exp, name)
        if _epochs_done(run_dir) >= epochs:
            continue
        cmd = [sys.executable, '-m', 'timm_arm.run', train_py, '--config', recipe, '--data-dir', exp.data,
               '--output', exp.finetune,
               '--experiment', name, '--workers', workers, '--epochs', epochs]
        if name == 'arm_pretrained':
            cmd += ['--pretrained-path', exp.pretrain / 'export' / 'model.safetensors']
        cmd += shlex.split(exp.args.finetune_args)
        if (run_dir / 'last.pth.tar').is_file():
            cmd += ['--resume', run_dir / 'last.pth.tar']
        procs[name] = (exp.run(cmd, exp.out / f'finetune_{name}.log'), time.perf_counter())
    for name, (proc, started) in procs.items():
        _wait(proc, exp.out / f'finetune_{name}.log')
        exp.record(f'finetune_{name}', time.perf_counter() - started, card=_card(), concurrent=len(procs),
                   recipe=str(FINETUNE_RECIPES[name].relative_to(REPO)), epochs=_epochs(exp, name),
                   extra_args=exp.args.finetune_args)
    if procs:
        exp.record('finetune', time.perf_counter() - start, card=_card())


def _validate(exp: Experiment, model_args, results: Path, log: Path, env=None) -> dict:
    cmd = [sys.executable, '-m', 'timm_arm.run', exp.script('validate.py'), *model_args, '--data-dir', exp.data,
           '--split', 'test', '--crop-pct', '1.0', '--batch-size', '500', '--workers', '8',
           '--results-file', results, '--results-format', 'json']
    start = time.perf_counter()
    _wait(exp.run(cmd, log, env=env), log)
    row = json.loads(results.read_text())
    row = row[0] if isinstance(row, list) else row
    row['seconds'] = round(time.perf_counter() - start, 1)
    return row


def step_evaluate(exp: Experiment) -> None:
    for name in FINETUNE_RECIPES:
        if f'evaluate_{name}' in exp.state:
            continue
        checkpoint = exp.finetune / name / 'last.pth.tar'
        row = _validate(exp, ['--model', ARCH, '--num-classes', '10', '--checkpoint', checkpoint],
                        exp.out / f'eval_{name}.json', exp.out / f'evaluate_{name}.log')
        exp.record(f'evaluate_{name}', row['seconds'], top1=row['top1'], top5=row['top5'], card=_card())


def _sha256(path: Path) -> str:
    from timm_arm.hub.source import sha256_file
    return sha256_file(path)


def step_hub(exp: Experiment) -> None:
    top1 = exp.state['evaluate_arm_pretrained']['top1']
    sources = {
        'classifier': exp.finetune / 'arm_pretrained' / 'last.pth.tar',
        'encoder': exp.pretrain / 'export' / 'model.safetensors',
    }
    recipes = {'classifier': [FINETUNE_RECIPES['arm_pretrained'], PRETRAIN_RECIPE], 'encoder': [PRETRAIN_RECIPE]}
    cache = exp.out / 'hf_cache'
    for form, tag in TAGS.items():
        folder = exp.hub / tag
        cmd = [sys.executable, '-m', 'timm_arm.hub', 'convert', sources[form], folder, '--model', tag,
               '--dataset', 'CIFAR-10', '--overwrite']
        if form == 'classifier':
            cmd += ['--metrics', f'top1={top1}', f'top5={exp.state["evaluate_arm_pretrained"]["top5"]}']
        for recipe in recipes[form]:
            cmd += ['--recipe', recipe]
        _wait(exp.run(cmd, exp.out / 'hub.log'), exp.out / 'hub.log')
        cmd = [sys.executable, '-m', 'timm_arm.hub', 'cache', folder, '--cache-dir', cache]
        _wait(exp.run(cmd, exp.out / 'hub.log'), exp.out / 'hub.log')
    files = {tag: {f.name: _sha256(f) for f in sorted((exp.hub / tag).iterdir())} for tag in TAGS.values()}

    folder = exp.hub / TAGS['classifier']
    local = _validate(exp, ['--model', f'local-dir:{folder}', '--pretrained'], exp.out / 'eval_hub_local_dir.json',
                      exp.out / 'evaluate_hub.log')
    offline = dict(exp.env, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY='1')
    cached = _validate(exp, ['--model', TAGS['classifier'], '--pretrained'], exp.out / 'eval_hub_cache.json',
                       exp.out / 'evaluate_hub.log', env=offline)
    exp.record('hub', local['seconds'] + cached['seconds'], files=files, local_dir_top1=local['top1'],
               hf_cache_top1=cached['top1'], card=_card())
    for name, value in (('local-dir:', local['top1']), ('offline Hub cache', cached['top1'])):
        if abs(value - top1) > 1e-6:
            raise SystemExit(f'cifar10_repro: {name} gives top-1 {value}, the checkpoint {top1}')


def _summary_rows(path: Path):
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(path.open())] if path.is_file() else []


def summarize(exp: Experiment) -> tuple:
    """The results record from OUT's state, the pretraining log and the fine-tuning summaries; also the curves."""
    state = exp.state
    pretrain_log = [json.loads(line) for line in (exp.pretrain / 'log.jsonl').open()]
    curves = {name: _summary_rows(exp.finetune / name / 'summary.csv') for name in FINETUNE_RECIPES}
    minutes = lambda step: round(sum(state.get(step, {}).get('seconds', [])) / 60, 2)  # noqa: E731
    pretrain_minutes = minutes('pretrain')
    runs = {}
    for name in FINETUNE_RECIPES:
        ev = state[f'evaluate_{name}']
        runs[name] = dict(
            top1=ev['top1'], top5=ev['top5'], finetune_epochs=state[f'finetune_{name}']['epochs'],
            pretrain_epochs=pretrain_log[-1]['epoch'] + 1 if name == 'arm_pretrained' else 0,
            finetune_gpu_minutes=minutes(f'finetune_{name}'),
            pretrain_gpu_minutes=pretrain_minutes if name == 'arm_pretrained' else 0.,
            best_epoch_top1=max(r['eval_top1'] for r in curves[name]), recipe=state[f'finetune_{name}']['recipe'],
            extra_args=state[f'finetune_{name}'].get('extra_args', ''), commit=state[f'finetune_{name}'].get('commit'),
            card=state[f'finetune_{name}']['card'])
    cards = list(dict.fromkeys([state['pretrain']['card']] + [r['card'] for r in runs.values()]))
    total = round(pretrain_minutes + minutes('finetune') + sum(
        state[k]['seconds'][0] / 60 for k in state if k.startswith('evaluate_')) + minutes('hub'), 2)
    result = dict(
        benchmark='cifar10_repro', model=ARCH, commit=exp.args.commit,
        card=cards[0] if len(cards) == 1 else f'pretraining: {cards[0]}; fine-tuning: {", ".join(cards[1:])}',
        date=time.strftime('%Y-%m-%d'), runs=runs, gap_top1=round(runs['arm_pretrained']['top1']
                                                                 - runs['scratch']['top1'], 2),
        total_gpu_minutes=total, finetune_concurrent=state['finetune_arm_pretrained'].get('concurrent', 1),
        pretrain=dict(recipe=state['pretrain']['recipe'], extra_args=state['pretrain'].get('extra_args', ''),
                      commit=state['pretrain'].get('commit'), final_loss=pretrain_log[-1]['loss'],
                      img_per_s=sorted(r['img_per_s'] for r in pretrain_log)[len(pretrain_log) // 2]),
        hub=state.get('hub', {}), anchors=[dict(zip(('source', 'model', 'protocol', 'scratch', 'pretrained'), a))
                                           for a in ANCHORS],
        versions=dict(python=platform.python_version()))
    return result, pretrain_log, curves


def step_report(exp: Experiment) -> None:
    """Results JSON + Markdown table + PNG curves into --results (benchmarks/results by default)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    result, pretrain_log, curves = summarize(exp)
    runs = result['runs']
    results = Path(exp.args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = exp.args.results_name
    (results / f'{stem}.json').write_text(json.dumps(result, indent=2) + '\n')

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r['step'] for r in pretrain_log], [r['loss'] for r in pretrain_log], lw=1)
    ax.set(xlabel='update', ylabel='loss (normalised-pixel MSE)', yscale='log',
           title=f'ARM pretraining of {ARCH} on CIFAR-10')
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(results / f'{stem}_pretrain_loss.png', dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, label in (('arm_pretrained', 'ARM-pretrained'), ('scratch', 'from scratch')):
        rows = curves[name]
        ax.plot([r['epoch'] + 1 for r in rows], [r['eval_top1'] for r in rows],
                label=f'{label}: {runs[name]["top1"]:.2f} %')
    ax.set(xlabel='fine-tuning epoch', ylabel='CIFAR-10 test top-1 (%)', title=f'{ARCH}, timm train.py')
    ax.set_ylim(bottom=max(0, min(min(r['eval_top1'] for r in rows) for rows in curves.values()) - 2))
    ax.legend()
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(results / f'{stem}_finetune_top1.png', dpi=120)
    (results / f'{stem}.md').write_text(markdown(result) + '\n')
    print(markdown(result))


def markdown(result: dict) -> str:
    pre, scratch = result['runs']['arm_pretrained'], result['runs']['scratch']
    pretrain_commit = result['pretrain'].get('commit') or result['commit']
    commits = result['commit'][:10] if pretrain_commit == result['commit'] else \
        f'{result["commit"][:10]} (pretraining: {pretrain_commit[:10]})'
    extra = pre.get('extra_args') or ''
    lines = [
        f'CIFAR-10 test top-1 (%), 10 000 images, 32 px; {result["card"]}, commit {commits}, '
        f'{result["total_gpu_minutes"]:.1f} GPU minutes for the whole experiment.'
        + (f' Fine-tuning recipes with `{extra}`.' if extra else ''),
        '',
        '| source | model | protocol | from scratch | pretrained (self-supervised) |',
        '| --- | --- | --- | --- | --- |',
        f'| **timm-arm** (this repository) | `{result["model"]}` (ARM-Ti, 5.6 M, patch 4) | ARM '
        f'{pre["pretrain_epochs"]} ep ({pre["pretrain_gpu_minutes"]:.1f} min), FT {pre["finetune_epochs"]} ep '
        f'({pre["finetune_gpu_minutes"]:.1f} min, both FT runs sharing the GPU) | **{scratch["top1"]:.2f}** | '
        f'**{pre["top1"]:.2f}** |',
    ]
    for a in result['anchors']:
        pretrained = f'{a["pretrained"]:.2f}' if a['pretrained'] is not None else '–'
        lines.append(f'| {a["source"]} | {a["model"]} | {a["protocol"]} | {a["scratch"]:.2f} | {pretrained} |')
    return '\n'.join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='working folder (data, checkpoints, logs)')
    parser.add_argument('--timm-scripts', default='', help="folder with timm's train.py and validate.py")
    parser.add_argument('--tarballs', default='', help='folder with CIFAR-10 train.tar.gz and test.tar.gz')
    parser.add_argument('--data', default='', help='folder with train/ and test/ (instead of --tarballs)')
    parser.add_argument('--steps', default=','.join(STEPS), help=f'comma-separated subset of {",".join(STEPS)}')
    parser.add_argument('--pretrain-epochs', type=int, default=0, help='override the pretraining recipe')
    parser.add_argument('--finetune-epochs', type=int, default=0, help='override both fine-tuning recipes')
    parser.add_argument('--pretrain-args', default='', help='extra timm-arm-pretrain arguments (one string)')
    parser.add_argument('--finetune-args', default='', help="extra train.py arguments for both runs (one string)")
    parser.add_argument('--results', default=str(REPO / 'benchmarks' / 'results'), help='where report writes')
    parser.add_argument('--results-name', default='cifar10_repro',
                        help='file name stem of the results (a variant of the recipes: another name)')
    parser.add_argument('--commit', default=os.environ.get('TIMM_ARM_COMMIT', ''), help='commit measured')
    args = parser.parse_args()
    steps = [s for s in args.steps.split(',') if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f'unknown steps {unknown}; choose from {STEPS}')
    if not args.commit:  # the copy a GPU machine runs has no git history: pass --commit / TIMM_ARM_COMMIT there
        args.commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                     cwd=REPO).stdout.strip() or 'unknown'
    exp = Experiment(args)
    exp.out.mkdir(parents=True, exist_ok=True)
    if any(s != 'report' for s in steps):
        if not (args.data or args.tarballs):
            parser.error('give --tarballs or --data')
        extract(exp)
    for step in STEPS:
        if step in steps:
            print(f'== {step}', flush=True)
            globals()[f'step_{step}'](exp)
    return 0


if __name__ == '__main__':
    sys.exit(main())
