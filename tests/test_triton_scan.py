""" The Triton selective scan against the sequential reference, forward and all eight gradients.

Without a CUDA device the kernels run in Triton's CPU interpreter. TRITON_INTERPRET must be set before triton is
imported, so the checks run in their own process (tests/triton_scan_check.py) and nothing leaks into other tests.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='triton is not installed')

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_scan_matches_sequential():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get('PYTHONPATH')]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, 'triton_scan_check.py')], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and 'ALL OK' in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]


def _compile_bwd_sm90():
    """The default backward kernel compiled for sm_90 (Triton's CUDA compiler runs without a GPU)."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'benchmarks'))
    from sass_mix import compile_sm90
    from timm_arm.ops import triton_scan as ts
    cfg = ts.scan_config(768, 197, 16)
    assert ts._lane_tile(cfg, 16), 'ARM-B shape no longer uses the lane tile'
    flags = dict(NP=16, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, HAS_ORDER=True, BLOCK_D=cfg.block_d_bwd,
                 T=cfg.T_bwd, M=cfg.chunks_per_segment, LANE_TILE=True, HAS_STATES=True, ATOMIC=True)
    return compile_sm90(ts._scan_bwd_kernel, flags, cfg.warps_bwd, cfg.max_registers_bwd)


def test_lane_tile_layout_puts_channels_on_lane_bits():
    """The reduce-scatter's warp shuffles exchange registers between lanes c and c ^ 2^i, which is channel c ^ 2^i
    only if Triton lays the shuffled tensors out with the 16 channels on lane bits 0-3 (fastest dimension,
    one element per thread, one warp). Read that from the compiled TTGIR."""
    pytest.importorskip('triton.backends.nvidia')
    try:
        kernel = _compile_bwd_sm90()
    except Exception as e:  # pragma: no cover - no CUDA toolchain in this triton build
        pytest.skip(f'cannot compile for sm_90 here: {type(e).__name__}: {e}')
    ttgir = kernel.asm['ttgir']
    layouts = dict(re.findall(r'^(#\w+) = #ttg\.blocked<\{(.*?)\}>', ttgir, re.M))
    shuffles = re.findall(r'elementwise_inline_asm "shfl\.sync\.bfly\.b32 \$0, \$1, (\d+),.*?-> tensor<([0-9x]+)xf32, (#\w+)>',
                          ttgir)
    assert sorted(int(m) for m, _, _ in shuffles) == [1, 1, 2, 2, 4, 4, 8, 8]  # dB and dC, 4 levels each
    for _, shape, layout in shuffles:
        assert layout in layouts, f'shuffle operand in a non-blocked layout {layout}'
        fields = {k: [int(v) for v in vs.split(',')] for k, vs in
                  re.findall(r'(\w+) = \[([0-9, ]+)\]', layouts[layout])}
        rank = len(shape.split('x'))
        assert shape.split('x')[-1] == '16'
        assert fields['threadsPerWarp'][-1] == 16 and fields['order'][0] == rank - 1, layouts[layout]
        assert set(fields['sizePerThread']) == {1} and set(fields['warpsPerCTA']) == {1}, layouts[layout]


def test_triton_conv_rejects_widths_above_four():
    """The Triton conv keeps up to 4 taps in registers (causal-conv1d's limit too): wider is a clear error,
    raised before any kernel launch."""
    import torch
    from timm_arm.ops.triton_scan import causal_conv1d_silu_tokens, mixer_core_tokens
    x = torch.randn(1, 6, 8)
    with pytest.raises(ValueError, match='widths 1 to 4.*got 5'):
        causal_conv1d_silu_tokens(x, torch.randn(2, 8, 5), torch.randn(2, 8))
    K, d, N, R = 2, 8, 4, 2
    with pytest.raises(ValueError, match='widths 1 to 4.*got 6'):
        mixer_core_tokens(torch.randn(1, 6, 2 * d), torch.randn(K, d, 6), torch.randn(K, d),
                          torch.randn(K, R + 2 * N, d), torch.randn(K, d, R), torch.randn(K, d), -torch.rand(K, d, N),
                          torch.randn(K, d))


def test_fused_mixer_and_mlp_reject_mismatched_shapes():
    """The one-node mixer and MLP check their weights against the input before any GEMM or launch."""
    import torch
    from timm_arm.ops.triton_scan import mixer_tokens, swiglu_mlp_triton
    K, d, N, R, dim = 2, 8, 4, 2, 6
    core = (torch.randn(K, d, 4), torch.randn(K, d), torch.randn(K, R + 2 * N, d), torch.randn(K, d, R),
            torch.randn(K, d), -torch.rand(K, d, N), torch.randn(K, d))
    x = torch.randn(1, 5, dim)
    with pytest.raises(ValueError, match=r'in_proj_weight \(16, 7\)'):
        mixer_tokens(x, torch.randn(2 * d, dim + 1), *core, torch.randn(dim, d))
    with pytest.raises(ValueError, match=r'in-projection width 14'):
        mixer_tokens(x, torch.randn(2 * d - 2, dim), *core, torch.randn(dim, d))
    with pytest.raises(ValueError, match=r'out_proj_weight \(6, 9\)'):
        mixer_tokens(x, torch.randn(2 * d, dim), *core, torch.randn(dim, d + 1))
    with pytest.raises(ValueError, match=r'fc1 weight \(10, 6\)'):
        swiglu_mlp_triton(x, torch.randn(10, dim), None, torch.randn(dim, 4), None)
    with pytest.raises(ValueError, match=r'fc1 weight \(8, 6\)'):
        swiglu_mlp_triton(x, torch.randn(8, dim), torch.randn(7), torch.randn(dim, 4), None)
