""" Reading and writing weights: torch.save files read without unpickling anything but tensors and plain containers,
with errors that say what is wrong with the file (empty, truncated, not a checkpoint, holding objects it must not
load); timm folders (model.safetensors + config.json) written atomically.
"""
import contextlib
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

__all__ = ['UnreadableCheckpoint', 'load_weights_only', 'check_weights_file', 'replace_folder', 'write_timm_folder']


class UnreadableCheckpoint(ValueError):
    """A file that cannot be read as a checkpoint; `problem` says why in one line."""

    def __init__(self, path: Any, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f'{self.path}: {problem}')


def _unpickling_problem(path: Any, e: Exception, safe_globals: Sequence[type]) -> str:
    text = str(e)
    m = re.search(r'Unsupported global: GLOBAL ([\w.]+)', text)
    if m:
        names = ['tensors', 'plain containers'] + [f'{c.__module__}.{c.__qualname__}' for c in safe_globals]
        allowed = ', '.join(names[:-1]) + ' and ' + names[-1]
        return (f'refused to unpickle {m.group(1)}: only {allowed} are loaded (weights_only), and this file holds '
                f'other objects')
    m = re.search(r'WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)', text, re.S)
    detail = m.group(1) if m else text.splitlines()[0] if text else type(e).__name__
    if not zipfile.is_zipfile(path):
        return f"not a PyTorch checkpoint: neither torch.save's zip format nor a readable pickle ({detail})"
    return f'corrupt checkpoint (the weights-only unpickler stops at: {detail})'


def _file_problem(path: Any) -> str:
    """What is wrong with a torch.save file on its face (empty, not / an incomplete zip archive), '' if nothing."""
    size = os.path.getsize(path)
    if size == 0:
        return 'the file is empty (0 bytes)'
    with open(path, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK\x03\x04') and not zipfile.is_zipfile(path):
        return f'truncated or corrupt checkpoint (incomplete zip archive, {size:,} bytes)'
    return ''


def load_weights_only(path: Any, safe_globals: Sequence[type] = (), mmap: bool = False) -> Any:
    """torch.load(path, weights_only=True) on the CPU, allowing `safe_globals` too; UnreadableCheckpoint if it fails.

    Only torch.save's zip format is memory-mapped (mmap=True); legacy pickles are read whole."""
    if not os.path.isfile(path):
        raise UnreadableCheckpoint(path, 'no such file')
    problem = _file_problem(path)
    if problem:
        raise UnreadableCheckpoint(path, problem)
    # torch's safe_globals() context removes its globals on exit even if they were allow-listed before (as
    # timm_arm's __init__ does for argparse.Namespace): add only what is missing
    missing = [g for g in safe_globals if g not in torch.serialization.get_safe_globals()]
    try:
        with torch.serialization.safe_globals(missing) if missing else contextlib.nullcontext():
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise UnreadableCheckpoint(path, _unpickling_problem(path, e, safe_globals)) from None
    except Exception as e:  # the legacy unpickler meets arbitrary bytes with arbitrary errors
        text = str(e).splitlines()[0] if str(e) else ''
        what = f'{type(e).__name__}: {text}' if text else type(e).__name__
        if isinstance(e, EOFError) or 'EOF' in text or 'zip archive' in text:
            raise UnreadableCheckpoint(path, f'truncated or corrupt checkpoint ({what})') from None
        if not zipfile.is_zipfile(path):
            raise UnreadableCheckpoint(path, f"not a PyTorch checkpoint: neither torch.save's zip format nor a "
                                             f'readable pickle ({what})') from None
        raise UnreadableCheckpoint(path, f'unreadable checkpoint ({what})') from None


def check_weights_file(path: Any) -> None:
    """Cheap look at a weights file before a model is built from it (safetensors header, zip directory);
    UnreadableCheckpoint with the reason if it cannot be a readable one."""
    if not os.path.isfile(path):
        raise UnreadableCheckpoint(path, 'no such file')
    if str(path).endswith('.safetensors'):
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                f.keys()
        except Exception as e:
            reason = str(e).replace('Error while deserializing header: ', '') or type(e).__name__
            raise UnreadableCheckpoint(path, f'not a readable safetensors file, truncated or corrupt ({reason})') \
                from None
        return
    problem = _file_problem(path)
    if problem:
        raise UnreadableCheckpoint(path, problem)


def replace_folder(tmp: Any, out: Any, overwrite: bool = True) -> None:
    """Move the complete folder `tmp` to `out` by renames only: `out` is the old folder or the new one, never a
    mix; an existing `out` is replaced only when `overwrite`."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(out)
    old = out.with_name(f'.{out.name}.old-{os.getpid()}')
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_timm_folder(
        model: torch.nn.Module,
        out: Any,
        model_args: Dict[str, Any],
        model_config: Optional[Dict[str, Any]] = None,
        files: Optional[Dict[str, str]] = None,
        check: Optional[Callable[[Path], None]] = None,
        overwrite: bool = True,
) -> Path:
    """What timm's save_for_hf writes (model.safetensors, config.json), plus text `files`, into `out` atomically:
    written to a temporary folder beside it, passed to `check` (which may raise), then renamed into place.

    config.json's model_args are exactly `model_args` (timm >= 1.0.31 would also add the factory's own arguments,
    which for an encoder in its pretraining form are not the shape to rebuild it in).
    """
    from timm.models import save_for_hf
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.partial-', dir=out.parent))
    try:
        if hasattr(model, '_model_args'):
            model._model_args = dict(model_args)
        save_for_hf(model, tmp, safe_serialization=True, model_config=model_config, model_args=dict(model_args))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding='utf-8')
        if check is not None:
            check(tmp)
        umask = os.umask(0)  # mkdtemp / safetensors create owner-only entries: ordinary modes
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.rglob('*'):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        replace_folder(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
