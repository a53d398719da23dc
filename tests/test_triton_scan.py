""" The Triton selective scan against the sequential reference, forward and all eight gradients.

Without a CUDA device the kernels run in Triton's CPU interpreter. TRITON_INTERPRET must be set before triton is
imported, so the checks run in their own process (tests/triton_scan_check.py) and nothing leaks into other tests.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='triton is not installed')

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_scan_matches_sequential():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get('PYTHONPATH')]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, 'triton_scan_check.py')], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and 'ALL OK' in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
