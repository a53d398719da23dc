""" Reading checkpoints safely, and telling what they hold.

Accepted: the public reference code's checkpoints (pickled .pth with 'model' / 'model_ema' / 'optimizer' / 'args'
entries, fine-tuning or pretraining layout), timm-arm's own training checkpoints ('model', or timm train.py's
'state_dict' / 'state_dict_ema'), bare state dicts in .pth or .safetensors, and folders holding model.safetensors
(our pretrainer's export, or a folder written by `timm-arm-hub convert`).

Pickles are read with torch.load(weights_only=True): tensors, plain containers and primitives, plus exactly the
classes the reference checkpoints need (argparse.Namespace, their training arguments). Nothing else is unpickled.
"""
import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import safetensors.torch
import torch

from timm_arm.serialization import UnreadableCheckpoint, load_weights_only

__all__ = ['HubError', 'SAFE_GLOBALS', 'read_checkpoint', 'describe_state_dict', 'CheckpointInfo', 'sha256_file']

# The only non-primitive classes a reference-code checkpoint pickles (its argparse training arguments).
SAFE_GLOBALS = [argparse.Namespace]

_ENTRIES = ('model', 'state_dict', 'model_ema', 'state_dict_ema')  # where training code keeps the weights
_FOLDER_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')


class HubError(Exception):
    """A problem with one file or folder, reported as one line: `<path>: <problem>`."""

    def __init__(self, path: Any, problem: str):
        self.path = str(path)
        self.problem = ' '.join(str(problem).split())  # always one line
        super().__init__(f'{self.path}: {self.problem}')


def sha256_file(path: Any, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def _resolve_file(path: Path) -> Path:
    if path.is_dir():
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise HubError(path, f'folder holds no checkpoint (looked for {", ".join(_FOLDER_FILES)})')
    if not path.is_file():
        raise HubError(path, 'no such file or folder')
    return path


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except Exception as e:
        reason = str(e).replace('Error while deserializing header: ', '')
        raise HubError(path, f'not a readable safetensors file, truncated or corrupt ({reason})') from None


def _load_pickle(path: Path) -> Any:
    try:
        return load_weights_only(path, SAFE_GLOBALS, mmap=True)
    except UnreadableCheckpoint as e:
        raise HubError(path, e.problem) from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def read_checkpoint(path: Any, entry: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Path, str]:
    """Read the weights of a checkpoint file or folder.

    Args:
        path: A .pth / .pt / .bin / .safetensors file, or a folder with model.safetensors (or pytorch_model.bin).
        entry: Which entry of a training checkpoint to take ('model', 'model_ema', 'state_dict', ...; 'ema' for
            'model_ema' or 'state_dict_ema', whichever the file has). Default:
            the first of 'model', 'state_dict', or the whole file if it is a bare state dict.

    Returns:
        (state dict of tensors with any DDP 'module.' prefix removed, the file read, the entry taken or '').
    """
    file = _resolve_file(Path(path))
    with open(file, 'rb') as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length (that fits the file), then a JSON header
    is_safetensors = file.suffix == '.safetensors' or (
        len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < file.stat().st_size)
    obj = _load_safetensors(file) if is_safetensors else _load_pickle(file)

    if not isinstance(obj, dict):
        raise HubError(file, f'not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors')
    taken = ''
    if entry == 'ema':  # the reference code's EMA entry, or timm train.py's
        entry = next((k for k in ('model_ema', 'state_dict_ema') if k in obj), 'model_ema')
    if entry:
        if entry not in obj:
            keys = ', '.join(map(str, list(obj)[:12]))
            raise HubError(file, f'no {entry!r} entry (entries: {keys})')
        obj, taken = obj[entry], entry
    elif not _is_tensor_dict(obj):
        taken = next((k for k in _ENTRIES if _is_tensor_dict(obj.get(k))), '')
        if not taken:
            keys = ', '.join(map(str, list(obj)[:12]))
            raise HubError(file, f'no tensors found: neither a state dict nor a dict with a '
                                 f'{"/".join(_ENTRIES)} entry (entries: {keys})')
        obj = obj[taken]
    if not _is_tensor_dict(obj):
        raise HubError(file, f'entry {taken!r} holds no tensors')
    state_dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict, file, taken


@dataclass
class CheckpointInfo:
    """The shape of an ARM checkpoint, read from its tensors (any supported layout)."""
    layout: str  # 'reference', 'timm-arm', 'timm-arm-pretrainer'
    embed_dim: int
    depth: int
    patch_size: int
    in_chans: int
    grid: Tuple[int, int]
    class_token: bool  # a class position in the position embedding
    num_directions: int
    num_classes: Optional[int]  # None: no head

    @property
    def is_encoder(self) -> bool:
        """A 1-direction AR-pretraining encoder (no class token, no head)."""
        return self.num_directions == 1

    @property
    def img_size(self) -> Tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    def summary(self) -> str:
        form = 'AR-pretrained encoder' if self.is_encoder else f'{self.num_classes or 0}-class classifier'
        return (f'{form}, {self.layout} layout: embed_dim={self.embed_dim}, depth={self.depth}, '
                f'patch {self.patch_size}, {self.grid[0]}x{self.grid[1]} grid ({self.img_size[0]} px), '
                f'{self.num_directions} scan direction(s)')


def describe_state_dict(state_dict: Dict[str, torch.Tensor], file: Any = '') -> CheckpointInfo:
    """Shape of an ARM checkpoint; raises HubError if it is not one."""
    layout = 'timm-arm'
    if any(k.startswith('encoder.') for k in state_dict):
        state_dict = {k[len('encoder.'):]: v for k, v in state_dict.items() if k.startswith('encoder.')}
        layout = 'timm-arm-pretrainer'
    patch = state_dict.get('patch_embed.proj.weight')
    pos = state_dict.get('pos_embed')
    if patch is None or pos is None or patch.ndim != 4 or pos.ndim != 3:
        keys = ', '.join(list(state_dict)[:8])
        raise HubError(file, f'not an ARM checkpoint: no patch_embed.proj.weight / pos_embed (keys: {keys} ...)')
    if any(k.startswith('layers.') for k in state_dict):
        layout, prefix = 'reference', 'layers.'
    else:
        prefix = 'blocks.'
    indices = {int(k.split('.')[1]) for k in state_dict if k.startswith(prefix) and k.split('.')[1].isdigit()}
    if not indices:
        raise HubError(file, 'not an ARM checkpoint: no layers.N / blocks.N keys')
    if layout == 'reference':
        num_directions = sum(f'layers.0.mixer.x_proj{s}.weight' in state_dict for s in ('', '_b', '_c', '_c_b'))
    else:
        x_proj = state_dict.get('blocks.0.mixer.x_proj_weight')
        num_directions = x_proj.shape[0] if x_proj is not None else 0
    head = state_dict.get('head.weight' if layout == 'reference' else 'head.fc.weight')

    num_pos = pos.shape[1]
    side = int(num_pos ** 0.5)
    if side * side == num_pos:
        class_token = False
    elif side * side + 1 == num_pos:
        class_token = True
    else:
        raise HubError(file, f'pos_embed of {num_pos} positions is not a square grid (with or without class position)')
    return CheckpointInfo(
        layout=layout,
        embed_dim=patch.shape[0],
        depth=max(indices) + 1,
        patch_size=patch.shape[-1],
        in_chans=patch.shape[1],
        grid=(side, side),
        class_token=class_token,
        num_directions=num_directions,
        num_classes=head.shape[0] if head is not None else None,
    )


def list_files(folder: Path) -> List[Path]:
    """Regular files of a folder, recursively, hidden ones excluded, as paths relative to it (sorted)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in sorted(files):
            if not name.startswith('.'):
                out.append((Path(root) / name).relative_to(folder))
    return out
