""" Before a model is built with pretrained=True: is its weight source there? A clear error in seconds instead of a
deep traceback (a truncated file) or a minute of Hub retries ending in 'check your connection' (unpublished weights).
"""
import os
from typing import Any, Dict, Optional

from timm.models import resolve_pretrained_cfg
from timm.models._hub import hf_split

from timm_arm.serialization import UnreadableCheckpoint, check_weights_file

__all__ = ['check_pretrained_source', 'hub_weights_problem', 'PretrainedUnavailable']

_HUB_FILES = ('model.safetensors', 'pytorch_model.bin')


class PretrainedUnavailable(RuntimeError):
    """pretrained=True, but the weights cannot be read or fetched."""


def _how_to_get(name: str) -> str:
    return (f'To use weights you have (the authors\' checkpoint, or your own): `timm-arm-hub convert CHECKPOINT '
            f'out/{name} --model {name}`, then timm.create_model(\'local-dir:out/{name}\', pretrained=True); or '
            f'timm.create_model(\'{name.split(".")[0]}\', pretrained=True, '
            f'pretrained_cfg_overlay=dict(file=\'CHECKPOINT\')). {_published()}')


def _published() -> str:
    from timm_arm.models.arm_mamba import HUB_REVISIONS
    tags = sorted(HUB_REVISIONS)
    return f'Tags published on the Hub: {", ".join(tags)}.' if tags else 'No tag is published on the Hub yet.'


def hub_weights_problem(hf_hub_id: str) -> Optional[str]:
    """None if the weights are in the local cache or on the Hub; else why they cannot be fetched."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    repo_id, revision = hf_split(hf_hub_id)
    for filename in _HUB_FILES:
        if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
            return None
    if constants.HF_HUB_OFFLINE:
        return 'offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache'
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=10)
    except Exception as e:  # no network, unknown repo or revision, auth
        kind = type(e).__name__
        if 'NotFound' in kind:
            return 'the repo does not exist on the Hub (these weights are not published)'
        return f'the Hub cannot be reached ({kind})'
    if not any(s.rfilename in _HUB_FILES for s in info.siblings or []):
        return 'the repo holds no model.safetensors (these weights are not published)'
    return None


def check_pretrained_source(variant: str, kwargs: Dict[str, Any]) -> None:
    """Raise PretrainedUnavailable when pretrained=True cannot get weights for `variant` (+ the tag / overlay in
    the create_model kwargs): a local file that is missing or unreadable, or a Hub repo whose weights cannot be
    fetched (offline and not cached, unreachable, not published)."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    name = f'{variant}.{cfg.tag}' if cfg.tag and cfg.tag != 'untrained' else variant
    if cfg.state_dict is not None:
        return
    if cfg.file:
        file = cfg.file
        if os.path.isdir(file):  # local-dir: a folder with the weights in it
            file = next((os.path.join(file, f) for f in _HUB_FILES if os.path.isfile(os.path.join(file, f))),
                        os.path.join(file, _HUB_FILES[0]))
        try:
            check_weights_file(file)
        except UnreadableCheckpoint as e:
            raise PretrainedUnavailable(f'{name}: pretrained weights {e.path}: {e.problem}') from None
        return
    if cfg.hf_hub_id:
        problem = hub_weights_problem(cfg.hf_hub_id)
        if problem:
            raise PretrainedUnavailable(
                f'{name}: cannot fetch its pretrained weights from the Hugging Face Hub repo {cfg.hf_hub_id}: '
                f'{problem}. {_how_to_get(name)}')
        return
    # no source at all (an .untrained tag): timm warns and keeps the random init, as for its own models
