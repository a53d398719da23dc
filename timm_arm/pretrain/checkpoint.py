""" Training checkpoints: atomic writes, keep-last-k, automatic resume, RNG state.

A checkpoint is a plain dict of tensors, dicts, lists and primitives, so it loads with torch.load(weights_only=True).
It is written to a temporary file in the same folder, fsync-ed, then renamed over its final name: a crash
during a write leaves only a stray `*.tmp` file and the previous checkpoints intact.
"""
import glob
import logging
import os
import random
import re
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from timm_arm.serialization import UnreadableCheckpoint, load_weights_only

__all__ = ['atomic_save', 'save_checkpoint', 'list_checkpoints', 'latest_checkpoint', 'load_checkpoint',
           'rng_state', 'set_rng_state', 'CheckpointError']

_logger = logging.getLogger(__name__)

_NAME = 'checkpoint-{:08d}.pth'
_PATTERN = re.compile(r'^checkpoint-(\d+)\.pth$')


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, or from another model / setup)."""


def atomic_save(obj: Any, path: str, save_fn=None) -> None:
    """Write `obj` with torch.save (or `save_fn(obj, file)`) to `path` atomically: temp file + fsync + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            (save_fn or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def list_checkpoints(folder: str) -> List[str]:
    """Checkpoints in `folder`, oldest first (by step number)."""
    found = []
    for path in glob.glob(os.path.join(folder, 'checkpoint-*.pth')):
        m = _PATTERN.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def _readable(path: str) -> bool:
    try:
        load_weights_only(path, mmap=True)
        return True
    except UnreadableCheckpoint:
        return False


def save_checkpoint(state: Dict[str, Any], folder: str, step: int, keep_last: int = 3) -> str:
    """Write checkpoint-{step}.pth atomically, then keep the newest `keep_last` readable checkpoints.

    Older readable ones are deleted; an unreadable one is never counted among those kept: it is renamed to
    `<name>.unreadable` (set aside, not deleted), so a torn or truncated file cannot push a good one out.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _NAME.format(step))
    atomic_save(state, path)
    if keep_last > 0:
        kept = 0
        for old in reversed(list_checkpoints(folder)):
            if old != path and not _readable(old):
                _logger.warning(f'Unreadable checkpoint {old} set aside as {old}.unreadable')
                os.replace(old, old + '.unreadable')
            elif kept < keep_last:
                kept += 1
            else:
                os.remove(old)
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    try:
        state = load_weights_only(path)
    except UnreadableCheckpoint as e:
        raise CheckpointError(f'Cannot read checkpoint {path}: {e.problem}') from None
    if not isinstance(state, dict) or 'model' not in state:
        raise CheckpointError(f'{path!r} is not a timm-arm pretraining checkpoint (no "model" entry).')
    return state


def latest_checkpoint(folder: str) -> Optional[str]:
    """Newest readable checkpoint in `folder` (an unreadable newest one is skipped with its name reported)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            load_weights_only(path, mmap=True)
            return path
        except UnreadableCheckpoint as e:
            _logger.warning(f'Skipping unreadable checkpoint {path}: {e.problem}')
    return None


def rng_state() -> Dict[str, Any]:
    """All RNG states as tensors / primitives (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'gauss': float(np_state[4])},
        'python': {'version': py_state[0], 'state': list(py_state[1]), 'gauss': py_state[2]},
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
