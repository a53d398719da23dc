""" Reading torch.save files without unpickling anything but tensors and plain containers, with errors that say what
is wrong with the file (empty, truncated, not a checkpoint, holding objects it must not load).
"""
import contextlib
import os
import pickle
import re
import zipfile
from typing import Any, Sequence

import torch

__all__ = ['UnreadableCheckpoint', 'load_weights_only', 'check_weights_file']


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
