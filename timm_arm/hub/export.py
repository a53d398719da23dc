""" Convert a checkpoint into a Hub-ready folder, and verify such a folder against its source.

A folder holds what timm's save_for_hf writes (model.safetensors, config.json with architecture / model_args /
pretrained_cfg) plus a README.md model card. Two forms:
    * classifier (fine-tuned, 4 scan directions, class token, head): loads as is;
    * AR-pretrained encoder (1 causal direction, sin-cos positions, no class token, no head): stored in its
      pretraining form; config.json's model_args describe only its shape, so timm builds the 4-direction
      classifier from it and arm_mamba.checkpoint_filter_fn copies the direction into all four (as the paper
      does before fine-tuning). Pass ENCODER_FORM as kwargs to get the pretraining form itself.

A conversion is lossless and strict: every tensor of the model comes from the checkpoint (no fresh head or class
token, no resampled position embedding), the result is checked against the source before the folder appears, and
the folder is written under a temporary name and renamed into place, so it is complete or absent.
"""
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import yaml

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg, is_model, list_models, list_pretrained, split_model_name_tag

from timm_arm.models.arm_mamba import ENCODER_FORM, HUB_ORG, checkpoint_filter_fn
from timm_arm.models.arm_pretrain import encoder_kwargs
from timm_arm.serialization import write_timm_folder

from .source import CheckpointInfo, HubError, describe_state_dict, read_checkpoint, sha256_file

__all__ = ['convert', 'verify', 'ENCODER_FORM', 'PAPER_RESULTS', 'model_card']

_logger = logging.getLogger(__name__)


# Published ImageNet-1k top-1 after fine-tuning (paper, Table 1): (name, arch, embed_dim, depth, params M, @224, @384)
PAPER_RESULTS = (
    ('ARM-B', 'arm_mamba_base', 768, 12, 85, 83.2, None),
    ('ARM-L', 'arm_mamba_large', 1024, 24, 297, 84.5, None),
    ('ARM-H', 'arm_mamba_huge', 1536, 24, 663, 85.0, 85.5),
)
_PAPER_NOTE = 'A supervised Mamba-B of the same shape as ARM-B reaches 81.2.'

# dataset named by a tag's middle word (arm_in1k, arm_cifar10_ar, ...): (card name, Hub dataset id)
DATASETS = {'in1k': 'ImageNet-1k', 'cifar10': 'CIFAR-10'}
_HUB_DATASETS = {'ImageNet-1k': 'imagenet-1k', 'CIFAR-10': 'cifar10'}

TEMPLATE = Path(__file__).resolve().parent / 'MODEL_CARD.md'  # also at hub/MODEL_CARD.md in the repository

_CITATION = """@inproceedings{ren2025autoregressive,
  title     = {Autoregressive Pretraining with Mamba in Vision},
  author    = {Ren, Sucheng and Li, Xianhang and Tu, Haoqin and Wang, Feng and Shu, Fangxun and Zhang, Lei and
               Mei, Jieru and Yang, Linjie and Wang, Peng and Wang, Heng and Yuille, Alan and Xie, Cihang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2406.07537}
}"""

_USAGE_CLASSIFIER = """```python
import timm
import timm_arm  # registers the ARM models in timm
from PIL import Image

model = timm.create_model('{load_name}', pretrained=True).eval(){alt_name}
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
image = Image.open('image.jpg').convert('RGB')
probs = model(transform(image).unsqueeze(0)).softmax(dim=-1)
top5_prob, top5_class = probs.topk(5)
```"""

_USAGE_ENCODER = """These are the weights of the encoder after autoregressive pretraining, before fine-tuning: no
class token, no classifier, one causal scan direction. timm builds the four-direction classifier from them (the
forward direction is copied into all four, a zero class position is inserted in the middle of the position
embedding, the head starts fresh), which is where the paper's fine-tuning starts:

```python
import timm
import timm_arm  # registers the ARM models in timm

# fine-tuning starting point: a new head for your classes (pass img_size=... to resample the {img_size} px positions)
model = timm.create_model('{load_name}', pretrained=True, num_classes=NUM_CLASSES)

# the encoder in its pretraining form (1 causal direction), e.g. for feature extraction
encoder = timm.create_model('{load_name}', pretrained=True, num_directions=1, class_token=False, pos_embed='sincos')
features = encoder.forward_features(images)  # (B, H/{patch_size}, W/{patch_size}, {embed_dim}) normalised patch tokens
```

Fine-tuning recipes for timm's train.py: `recipes/finetune/` in the timm-arm repository."""


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return ' '.join(line if line.endswith(':') or i == len(lines) - 1 else line + ';' for i, line in enumerate(lines))


def _arm_models() -> Tuple[str, ...]:
    return tuple(list_models('arm_mamba*'))


def _paper_row(embed_dim: int, depth: int):
    return next((r for r in PAPER_RESULTS if (r[2], r[3]) == (embed_dim, depth)), None)


def _dataset_of(model_id: str) -> Optional[str]:
    """The dataset named by a pretrained tag (arm_in1k_384 -> ImageNet-1k), None if it names none."""
    tag = model_id.partition('.')[2]
    return next((name for key, name in DATASETS.items() if f'_{key}' in f'_{tag}_'), None)


def _resolve_name(model_name: str, info: CheckpointInfo, file: Path, img_size_given: bool = False
                  ) -> Tuple[str, Dict[str, Any]]:
    """Registered '<arch>.<tag>' for the checkpoint, and its pretrained cfg.

    Without a tag: the architecture's tag of the checkpoint's form (encoder tags end in '_ar') and image size (any
    size when --model-kwargs gives img_size); a checkpoint that fits none gets the bare architecture."""
    arch, tag = split_model_name_tag(model_name)
    if not is_model(arch) or arch not in _arm_models():
        raise HubError(f'--model {model_name}', f'not an ARM model; choose one of {", ".join(_arm_models())}')
    tags = [split_model_name_tag(n)[1] for n in list_pretrained(f'{arch}.*')]
    same_form = [t for t in tags if t.endswith('_ar') == info.is_encoder]
    if tag:
        if tag.endswith('_ar') != info.is_encoder:
            want = 'an AR-pretrained encoder' if tag.endswith('_ar') else 'a fine-tuned classifier'
            better = ', '.join(f'{arch}.{t}' for t in same_form) or f'{arch} (no tag)'
            raise HubError(file, f'the checkpoint is an {info.summary()}, but {model_name} is {want} '
                                 f'(convert it as {better})')
        if tag not in tags:
            raise HubError(f'--model {model_name}', f'{arch} has no pretrained tag {tag!r} '
                                                    f'(its tags: {", ".join(tags) or "none"})')
        name = f'{arch}.{tag}'
        return name, get_pretrained_cfg(name).to_dict()
    for t in same_form:
        cfg = get_pretrained_cfg(f'{arch}.{t}')
        if img_size_given or tuple(cfg.input_size[1:]) == info.img_size:
            return f'{arch}.{t}', cfg.to_dict()
    cfg = get_pretrained_cfg(arch)
    if cfg.hf_hub_id:  # the default is a published tag, but not this checkpoint's: describe it as the bare arch
        cfg = replace(cfg, hf_hub_id=None, tag=None)
    return arch, cfg.to_dict()


def _run_args(file: Path, info: CheckpointInfo) -> Dict[str, Any]:
    """The args.yaml that timm's train.py or our pretrainer writes beside its checkpoints ({} where there is none).

    The pretrainer's model_kwargs hold the decoder's settings too: only the encoder's are kept."""
    path = file.parent / 'args.yaml'
    if not path.is_file():
        return {}
    try:
        run = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise HubError(path, f'unreadable training arguments ({_one_line(e)})') from None
    if not isinstance(run, dict):
        return {}
    if info.layout == 'timm-arm-pretrainer':
        return dict(model=run.get('model'), model_kwargs=encoder_kwargs(run.get('model_kwargs') or {}))
    return run


def _build(model_id: str, cfg: Dict[str, Any], info: CheckpointInfo, model_kwargs: Dict[str, Any], file: Path):
    """The target model for the checkpoint: its size from the architecture (+ kwargs), the rest from the checkpoint."""
    kwargs = dict(model_kwargs)
    if 'img_size' in kwargs:
        size = kwargs['img_size']
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = kwargs.get('patch_size', info.patch_size)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (size[0] // patch[0], size[1] // patch[1])
        if grid != info.grid:
            raise HubError(file, f'img_size={kwargs["img_size"]} makes a {grid[0]}x{grid[1]} patch grid, but the '
                                 f'position embedding is for {info.grid[0]}x{info.grid[1]}; a conversion does not '
                                 f'resample (omit img_size to use the checkpoint\'s)')
    else:
        cfg_size = tuple(cfg['input_size'][1:])
        if cfg.get('hf_hub_id') and cfg_size != info.img_size:
            raise HubError(file, f'the checkpoint is for {info.img_size[0]} px ({info.grid[0]}x{info.grid[1]} '
                                 f'patches of {info.patch_size}) but {model_id} is for {cfg_size[0]} px; choose the '
                                 f'matching tag, or pass --model-kwargs img_size=... to override')
        kwargs['img_size'] = info.img_size
    kwargs.setdefault('patch_size', info.patch_size)  # the checkpoint's own geometry, as detected
    if info.in_chans != 3:
        kwargs.setdefault('in_chans', info.in_chans)
    if info.is_encoder:
        kwargs.update(ENCODER_FORM, num_classes=0)
    elif 'num_classes' not in kwargs and info.num_classes is not None:
        kwargs['num_classes'] = info.num_classes
    try:
        model = timm.create_model(model_id, pretrained=False, **kwargs)
    except Exception as e:
        raise HubError(f'--model {model_id}', f'cannot build it with {kwargs}: {_one_line(e)}') from None
    return model.eval(), kwargs


def _load_strict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], file: Any, info: CheckpointInfo):
    """checkpoint_filter_fn, then a strict load in which every tensor must come from the checkpoint."""
    try:
        converted = checkpoint_filter_fn(state_dict, model)
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, KeyError):
            e = RuntimeError(f'missing key {e.args[0]} ({info.layout} layout)')
        problem = _one_line(e)
        row = _paper_row(info.embed_dim, info.depth)
        if (info.embed_dim, info.depth) != (model.embed_dim, len(model.blocks)):
            problem = (f'a checkpoint of another size: embed_dim={info.embed_dim}, depth={info.depth}'
                       + (f' ({row[1]})' if row else '') + f', the model embed_dim={model.embed_dim}, '
                       f'depth={len(model.blocks)}. {problem}')
        raise HubError(file, problem) from None
    own = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fresh = [k for k, v in converted.items() if v.numel() and own.get(k) == v.data_ptr()]
    if fresh:
        raise HubError(file, f'missing keys ({len(fresh)}): {", ".join(fresh)} (they would keep random values; '
                             f'a classifier without head converts with --model-kwargs num_classes=0)')
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as e:
        raise HubError(file, _one_line(e)) from None


def _test_images(cfg: Dict[str, Any], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth random images (bicubic-upsampled colour noise plus fine grain), normalised like real inputs."""
    g = torch.Generator().manual_seed(seed)
    C, H, W = cfg['input_size']
    low = torch.rand(batch, C, 7, 7, generator=g)
    img = F.interpolate(low, size=(H, W), mode='bicubic', align_corners=False)
    img = (img + 0.03 * torch.randn(batch, C, H, W, generator=g)).clamp(0, 1)
    mean = torch.tensor(cfg['mean']).view(1, -1, 1, 1)
    std = torch.tensor(cfg['std']).view(1, -1, 1, 1)
    return (img - mean) / std


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def verify(
        folder: Any,
        source: Optional[Any] = None,
        entry: Optional[str] = None,
        tolerance: float = 1e-5,
        source_state_dict: Optional[Dict[str, torch.Tensor]] = None,
        log: Callable[[str], None] = print,
) -> float:
    """Reload `folder` through timm ('local-dir:') and compare its outputs with the source checkpoint's.

    The source is loaded by a separate path (read_checkpoint -> checkpoint_filter_fn -> a fresh model built from
    config.json's architecture and model_args). Without a source, the folder's own weights are the reference, which
    checks the timm loading path (config, filter, data config) but not the conversion. Returns the largest relative
    difference of the outputs (features and logits); raises HubError above `tolerance`.
    """
    folder = Path(folder)
    for name in ('config.json', 'model.safetensors'):
        if not (folder / name).is_file():
            raise HubError(folder, f'no {name}: not a folder written by timm-arm-hub convert or save_for_hf')
    try:
        config = json.loads((folder / 'config.json').read_text())
        arch, model_args = config['architecture'], dict(config.get('model_args', {}))
    except (ValueError, KeyError) as e:
        raise HubError(folder / 'config.json', f'unreadable timm config ({_one_line(e)})') from None
    weights, _, _ = read_checkpoint(folder / 'model.safetensors')
    info = describe_state_dict(weights, folder / 'model.safetensors')
    form = dict(ENCODER_FORM) if info.is_encoder else {}

    try:
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True, **form).eval()
    except Exception as e:
        raise HubError(folder, f'timm cannot load it ({_one_line(e)})') from None
    if info.is_encoder:  # the way users load it: the 4-direction classifier, directions copied
        try:
            timm.create_model(f'local-dir:{folder}', pretrained=True)
        except Exception as e:
            raise HubError(folder, f'timm cannot load it as a classifier ({_one_line(e)})') from None

    if source_state_dict is None and source is not None:
        source_state_dict, file, _ = read_checkpoint(source, entry)
        recorded = config.get('conversion', {}).get('source_sha256')
        if recorded and recorded != sha256_file(file):
            log(f'note: {file} is not the file this folder was converted from (sha256 differs from config.json)')
    reference_file = source if source is not None else folder / 'model.safetensors'
    reference = timm.create_model(arch, pretrained=False, **{**model_args, **form}).eval()
    _load_strict(reference, source_state_dict if source_state_dict is not None else weights, reference_file,
                 describe_state_dict(source_state_dict, reference_file) if source_state_dict is not None else info)

    x = _test_images(resolve_data_config(model=loaded))
    with torch.no_grad():
        feats_a, feats_b = loaded.forward_features(x), reference.forward_features(x)
        logits_a, logits_b = loaded.forward_head(feats_a), reference.forward_head(feats_b)
    err = max(_max_rel(feats_a, feats_b), _max_rel(logits_a, logits_b))
    what = 'features' if info.is_encoder else 'logits'
    if not err <= tolerance:
        raise HubError(folder, f'{what} differ from {reference_file}: max relative error {err:.2e} > {tolerance:.0e}')
    log(f'verified {folder}: {what} {tuple(logits_a.shape)} match {reference_file} '
        f'(max relative error {err:.1e} <= {tolerance:.0e})')
    return err


def _results_section(arch: str, info: CheckpointInfo, dataset: str, metrics: Dict[str, float],
                     cfg: Dict[str, Any]) -> str:
    """Measured metrics when given; else the paper's table for an ImageNet-1k model of a published architecture."""
    H = cfg['input_size'][1]
    if metrics:
        rows = '\n'.join(f'| {name} | {value:.2f} |' for name, value in metrics.items())
        return (f'## Results: {dataset}\n| metric (%) | value |\n| --- | --- |\n{rows}\n\n'
                f"Measured with these weights by timm's validate.py on the {dataset} test images at {H} px "
                f"(crop {cfg.get('crop_pct', 1.0)}), fp32.")
    row = next((r for r in PAPER_RESULTS if r[1] == arch), None)
    if dataset != 'ImageNet-1k' or row is None:
        return '## Results\nNo results were recorded for these weights (`timm-arm-hub convert --metrics`).'
    lines = ['| Model | timm architecture | Width × depth | Params | Top-1 @ 224 | Top-1 @ 384 |',
             '| --- | --- | --- | --- | --- | --- |']
    for name, paper_arch, dim, depth, params, top1, top1_384 in PAPER_RESULTS:
        cells = [name, f'`{paper_arch}`', f'{dim} × {depth}', f'{params} M', f'{top1:.1f}',
                 f'{top1_384:.1f}' if top1_384 else '–']
        if paper_arch == arch:
            cells = [f'**{c}**' for c in cells]
        lines.append('| ' + ' | '.join(cells) + ' |')
    note = 'Numbers from the paper (fine-tuned on ImageNet-1k), not re-measured with these weights. ' + _PAPER_NOTE
    if (row[2], row[3]) != (info.embed_dim, info.depth):
        note += (f' These weights ({info.embed_dim} × {info.depth}) are not of the published {row[0]} shape; the '
                 f'table is for reference only.')
    if info.is_encoder:
        note += ' This folder holds the pretrained encoder: the numbers are reached after fine-tuning it.'
    return '## Results: ImageNet-1k top-1 (%)\n' + '\n'.join(lines) + '\n\n' + note


def _recipe_section(recipes: List[Any]) -> str:
    if not recipes:
        return ''
    parts = ['## Training recipe']
    for recipe in recipes:
        path = Path(recipe)
        try:
            text = path.read_text(encoding='utf-8').strip()
        except OSError as e:
            raise HubError(path, f'recipe unreadable ({e.strerror or e})') from None
        parts.append(f'`{path.name}`:\n```yaml\n{text}\n```')
    return '\n\n'.join(parts) + '\n\n'


def model_card(
        model: torch.nn.Module,
        model_id: str,
        repo_id: str,
        info: CheckpointInfo,
        cfg: Dict[str, Any],
        source_name: str,
        source_sha256: str,
        entry: str,
        template: Path = TEMPLATE,
        dataset: Optional[str] = None,
        metrics: Optional[Dict[str, float]] = None,
        recipes: Optional[List[Any]] = None,
) -> str:
    """README.md for the folder: the model card template (hub/MODEL_CARD.md) filled in with str.format.

    Args:
        dataset: Training dataset (default: the one the tag names, e.g. arm_cifar10 -> CIFAR-10).
        metrics: Measured results of these weights ({'top1': 96.1, ...}); without them an ImageNet-1k model of a
            published size shows the paper's table, any other model says that no results were recorded.
        recipes: Recipe files shown verbatim in the card.
    """
    try:
        text = Path(template).read_text(encoding='utf-8')
    except OSError as e:
        raise HubError(template, f'model card template unreadable ({e.strerror or e})') from None
    arch = model_id.split('.')[0]
    row = next((r for r in PAPER_RESULTS if r[1] == arch), None)
    dataset = dataset or _dataset_of(model_id) or 'an unspecified dataset'
    name = row[0] if row and dataset == 'ImageNet-1k' else 'an ARM Mamba'
    H, W = cfg['input_size'][1:]
    params = sum(p.numel() for p in model.parameters())
    registered = '.' in model_id  # a registered tag: pretrained=True finds it; otherwise name the Hub repo
    load_name = model_id if registered else f'hf-hub:{repo_id}'
    hub_dataset = _HUB_DATASETS.get(dataset)
    fields = dict(
        model_id=model_id if registered else repo_id.split('/')[-1],
        repo_id=repo_id,
        architecture=arch,
        license=cfg.get('license', 'apache-2.0'),
        pipeline_tag='image-feature-extraction' if info.is_encoder else 'image-classification',
        summary=(f'The encoder of {name} after autoregressive pretraining on {dataset} ({H} px), following '
                 f'"Autoregressive Pretraining with Mamba in Vision" (ICLR 2025).'
                 if info.is_encoder else
                 f'{name[0].upper() + name[1:]} image classifier: autoregressive pretraining, then fine-tuning on '
                 f'{dataset} at {H} px, following "Autoregressive Pretraining with Mamba in Vision" (ICLR 2025).'),
        dataset=dataset,
        datasets_yaml=f'datasets:\n- {hub_dataset}\n' if hub_dataset else '',
        model_type='Feature backbone (AR-pretrained encoder)' if info.is_encoder else 'Image classification',
        embed_dim=info.embed_dim,
        depth=info.depth,
        patch_size=info.patch_size,
        num_directions=info.num_directions,
        params_m=f'{params / 1e6:.1f}',
        image_size=f'{H} × {W}',
        mean=', '.join(f'{v:.3f}' for v in cfg['mean']),
        std=', '.join(f'{v:.3f}' for v in cfg['std']),
        interpolation=cfg.get('interpolation', 'bicubic'),
        crop_pct=cfg.get('crop_pct', 1.0),
        source_name=source_name,
        source_sha256=source_sha256,
        entry=entry or 'the whole file',
        layout=info.layout,
        results_section=_results_section(arch, info, dataset, dict(metrics or {}), cfg),
        recipe_section=_recipe_section(list(recipes or [])),
        usage=(_USAGE_ENCODER if info.is_encoder else _USAGE_CLASSIFIER).format(
            load_name=load_name, alt_name=f"  # or 'hf-hub:{repo_id}'" if registered else '', repo_id=repo_id,
            img_size=H, patch_size=info.patch_size, embed_dim=info.embed_dim),
        citation=_CITATION,
    )
    try:
        return text.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise HubError(template, f'bad placeholder in the model card template ({_one_line(e)})') from None


def convert(
        source: Any,
        out_dir: Any,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        entry: Optional[str] = None,
        overwrite: bool = False,
        repo_id: Optional[str] = None,
        check: bool = True,
        template: Path = TEMPLATE,
        log: Callable[[str], None] = print,
        dataset: Optional[str] = None,
        metrics: Optional[Dict[str, float]] = None,
        recipes: Optional[List[Any]] = None,
) -> Path:
    """Convert `source` (reference-code or timm-arm checkpoint) into the Hub-ready folder `out_dir`.

    Args:
        source: Checkpoint file or folder (see read_checkpoint).
        out_dir: Folder to create; an existing one is refused unless `overwrite`.
        model_name: 'arm_mamba_<size>[.<tag>]'; without a tag, the architecture's tag that matches the
            checkpoint's form and image size, else the bare architecture. None: the model of the train.py or
            timm-arm-pretrain run whose args.yaml lies beside the checkpoint.
        model_kwargs: Extra create_model kwargs (e.g. a non-standard size) over those of that args.yaml; img_size,
            patch_size and num_classes default to the checkpoint's. The run's crop_pct, mean, std and
            interpolation become the folder's data config.
        entry: Checkpoint entry to take ('model', 'model_ema', ...); default 'model' / 'state_dict'.
        repo_id: Hub repo named in the model card; default: the tag's hf_hub_id, else '<HUB_ORG>/<model>'.
        check: Verify the folder against the source before it is moved into place.
        dataset, metrics, recipes: For the model card (see model_card).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise HubError(out, 'already exists (pass --overwrite to replace it)')
    if out.exists() and not out.is_dir():
        raise HubError(out, 'exists and is not a folder')
    state_dict, file, taken = read_checkpoint(source, entry)
    info = describe_state_dict(state_dict, file)
    log(f'read {file}' + (f" (entry '{taken}')" if taken else '') + f': {info.summary()}')
    run = _run_args(file, info)
    if run:
        log(f'read {file.parent / "args.yaml"}: the training run\'s model arguments and data config')
    model_name = model_name or run.get('model') and split_model_name_tag(run['model'])[0]
    if not model_name:
        raise HubError(file, 'which model? Pass --model (no args.yaml of a train.py run beside the checkpoint)')
    model_kwargs = {**(run.get('model_kwargs') or {}), **(model_kwargs or {})}

    model_id, cfg = _resolve_name(model_name, info, file, img_size_given='img_size' in model_kwargs)
    model, kwargs = _build(model_id, cfg, info, model_kwargs, file)
    _load_strict(model, state_dict, file, info)
    # the preprocessing the weights were trained with, where the run recorded it
    data = {k: run[k] for k in ('crop_pct', 'mean', 'std', 'interpolation') if run.get(k) is not None}
    if data:
        model.pretrained_cfg = {**model.pretrained_cfg, **data}
    # config.json's model_args describe the shape only (an encoder's too, so timm builds the classifier from it)
    model_args = {k: v for k, v in kwargs.items() if k not in ENCODER_FORM}
    repo_id = repo_id or cfg.get('hf_hub_id') or f'{HUB_ORG}/{model_id}'
    source_sha256 = sha256_file(file)
    from timm_arm import __version__
    conversion = dict(
        tool=f'timm-arm-hub {__version__}', source=file.name, source_sha256=source_sha256,
        entry=taken or None, layout=info.layout, form='encoder' if info.is_encoder else 'classifier')

    def card_and_check(folder: Path) -> None:
        written_cfg = json.loads((folder / 'config.json').read_text())['pretrained_cfg']  # the data config as saved
        card = model_card(model, model_id, repo_id, info, written_cfg, file.name, source_sha256, taken,
                          template=template, dataset=dataset, metrics=metrics, recipes=recipes)
        (folder / 'README.md').write_text(card, encoding='utf-8')
        if check:
            verify(folder, source_state_dict=state_dict, log=lambda msg: None)

    try:
        write_timm_folder(model, out, model_args, model_config={'conversion': conversion}, check=card_and_check,
                          overwrite=overwrite)
    except FileExistsError:
        raise HubError(out, 'already exists (pass --overwrite to replace it)') from None
    log(f'wrote {out}: {", ".join(sorted(p.name for p in out.iterdir()))} ({model_id}'
        + (', verified against the source' if check else '') + ')')
    return out
