import sys

import pytest
import torch
import torch.nn.functional as F

from timm_arm import ops
from timm_arm.ops import causal_conv1d_silu, selective_scan, selective_scan_sequential, selective_scan_torch


def _inputs(batch, directions, d, seqlen, d_state, dtype=torch.float32, requires_grad=False):
    dim = directions * d
    tensors = dict(
        u=torch.randn(batch, dim, seqlen),
        delta=torch.rand(batch, dim, seqlen) * 0.5,  # a step size: >= 0 also without softplus, so decays <= 1
        A=-torch.rand(dim, d_state) * 4 - 0.1,
        B=torch.randn(batch, directions, d_state, seqlen),
        C=torch.randn(batch, directions, d_state, seqlen),
        D=torch.randn(dim),
        z=torch.randn(batch, dim, seqlen),
        delta_bias=torch.randn(dim) * 0.5,
    )
    for k in ('u', 'delta', 'B', 'C', 'z'):
        tensors[k] = tensors[k].to(dtype)
    if requires_grad:
        tensors = {k: v.requires_grad_() for k, v in tensors.items()}
    return tensors


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize('shape', [
    (2, 4, 8, 197, 16), (1, 1, 5, 7, 4), (3, 2, 6, 64, 8), (2, 4, 3, 50, 16), (1, 1, 4, 1, 16)])
@pytest.mark.parametrize('options', ['all', 'plain'])
def test_torch_scan_matches_sequential_fp32(shape, options):
    t = _inputs(*shape)
    kw = dict(delta_softplus=True) if options == 'all' else {}
    if options == 'plain':
        t.update(D=None, z=None, delta_bias=None)
    out = selective_scan_torch(**t, **kw)
    ref = selective_scan_sequential(**t, **kw)
    assert out.shape == t['u'].shape and out.dtype == torch.float32
    assert _rel_err(out, ref) < 1e-5


# lengths around the backward's segments (isqrt(L) + 1 steps): one step, one segment, a short last segment
@pytest.mark.parametrize('seqlen', [1, 2, 3, 4, 5, 8, 9, 10, 45, 65])
@pytest.mark.parametrize('options', ['all', 'plain'])
def test_torch_scan_gradients_match_sequential(seqlen, options):
    t = _inputs(2, 4, 4, seqlen, 8, requires_grad=True)
    kw = dict(delta_softplus=True) if options == 'all' else {}
    if options == 'plain':
        t.update(D=None, z=None, delta_bias=None)
    inputs = {k: v for k, v in t.items() if v is not None}
    grad_out = torch.randn(2, 16, seqlen)
    grads = []
    for fn in (selective_scan_torch, selective_scan_sequential):
        out = fn(**t, **kw)
        grads.append(torch.autograd.grad(out, list(inputs.values()), grad_out))
    for name, g, r in zip(inputs, *grads):
        assert _rel_err(g, r) < 1e-4, name


def test_torch_scan_bf16_gradients():
    t = _inputs(2, 4, 8, 33, 16, dtype=torch.bfloat16, requires_grad=True)
    out = selective_scan_torch(**t, delta_softplus=True)
    ref = selective_scan_sequential(**{k: v.float() for k, v in t.items()}, delta_softplus=True)
    grad_out = torch.randn(out.shape)
    grads = torch.autograd.grad(out, list(t.values()), grad_out.to(out.dtype))
    grads_ref = torch.autograd.grad(ref, list(t.values()), grad_out)
    assert out.dtype == torch.bfloat16
    for name, g, r in zip(t, grads, grads_ref):
        assert g.dtype == t[name].dtype and _rel_err(g, r) < 2e-2, name


def test_torch_scan_keeps_segment_states_only():
    """Backward memory: the inputs and ~sqrt(L) states of (b, D, N), not the (b, D, L, N) states of every step."""
    t = _inputs(2, 4, 8, 100, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        selective_scan_torch(**t, delta_softplus=True)
    assert sum(saved) < 20 * 2 * 32 * 100  # a few (b, D, L)-sized tensors; every state would be 2 * 32 * 100 * 16


def test_torch_scan_bf16_inputs():
    t = _inputs(2, 4, 8, 197, 16, dtype=torch.bfloat16)
    out = selective_scan_torch(**t, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_sequential(**{k: v.float() if v is not None else v for k, v in t.items()}, delta_softplus=True)
    assert _rel_err(out, ref) < 1e-2


def test_scan_groups_are_per_direction():
    # channels of direction k must read B/C of group k: permuting the groups must change the output
    t = _inputs(1, 2, 4, 20, 8)
    out = selective_scan_torch(**t)
    swapped = dict(t, B=t['B'].flip(1), C=t['C'].flip(1))
    assert _rel_err(selective_scan_torch(**swapped), out) > 1e-2
    # and direction 0 alone equals a 1-group scan of its own channels
    first = {k: (v[:, :4] if k in ('u', 'delta', 'z') else v[:4] if k in ('A', 'D', 'delta_bias') else v[:, :1])
             for k, v in t.items()}
    assert _rel_err(selective_scan_torch(**first), out[:, :4]) < 1e-5


def test_selective_scan_rejects_bad_groups():
    t = _inputs(1, 3, 2, 10, 4)
    t['B'] = torch.randn(1, 4, 4, 10)  # 6 channels cannot be split into 4 groups
    t['C'] = torch.randn(1, 4, 4, 10)
    with pytest.raises(ValueError, match='groups'):
        selective_scan_torch(**t)


@pytest.mark.parametrize('width', [2, 4])
def test_causal_conv_matches_loop(width):
    x = torch.randn(2, 6, 11)
    w = torch.randn(6, width)
    b = torch.randn(6)
    out = causal_conv1d_silu(x, w, b)
    ref = torch.zeros_like(x)
    for t in range(x.shape[-1]):
        for j in range(width):
            src = t - (width - 1) + j
            if src >= 0:
                ref[..., t] += w[:, j] * x[..., src]
    ref = F.silu(ref + b[:, None])
    assert torch.allclose(out, ref, atol=1e-6)


def test_backend_selection(monkeypatch):
    x = torch.randn(1, 2, 3)
    assert ops.resolve_backend(x) == 'torch'
    monkeypatch.setenv('TIMM_ARM_BACKEND', 'torch')
    assert ops.get_backend() == 'torch'
    monkeypatch.setenv('TIMM_ARM_BACKEND', 'bogus')
    with pytest.raises(ValueError, match='unknown backend'):
        ops.get_backend()
    monkeypatch.delenv('TIMM_ARM_BACKEND')
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # with it, 'triton' runs CPU tensors in the interpreter
    with pytest.raises(RuntimeError, match='needs CUDA tensors'):
        ops.resolve_backend(x, 'cuda')
    with pytest.raises(RuntimeError, match='"triton" needs CUDA tensors'):
        ops.resolve_backend(x, 'triton', op='scan')
    ops.set_backend('torch')
    try:
        assert ops.get_backend() == 'torch'
    finally:
        ops.set_backend(None)
    assert ops.get_backend() == 'auto'


@pytest.mark.parametrize('name, on_gpu, op, has_ext, has_triton, expected', [
    ('auto', False, 'scan', True, True, 'torch'),     # CPU, meta: always PyTorch
    ('auto', True, 'scan', True, True, 'triton'),     # GPU: our Triton path first
    ('auto', True, 'scan', False, True, 'triton'),
    ('auto', True, 'scan', True, False, 'cuda'),      # no triton: mamba-ssm's kernel
    ('auto', True, 'scan', False, False, 'torch'),    # neither: PyTorch
    ('auto', True, 'conv', True, True, 'cuda'),       # the channel-first conv: causal-conv1d or PyTorch
    ('auto', True, 'conv', False, True, 'torch'),
    ('triton', True, 'scan', True, True, 'triton'),
    ('triton', True, 'conv', True, True, 'cuda'),     # the channel-first conv has no Triton version
    ('triton', True, 'conv', False, True, 'torch'),
    ('cuda', True, 'scan', True, False, 'cuda'),
    ('torch', True, 'scan', True, True, 'torch'),
])
def test_backend_choice_table(name, on_gpu, op, has_ext, has_triton, expected):
    assert ops.choose_backend(name, on_gpu, op, has_ext, has_triton) == expected


@pytest.mark.parametrize('name, on_gpu, has_ext, has_triton, message', [
    ('cuda', False, True, True, '"cuda" needs CUDA tensors'),
    ('triton', False, True, True, '"triton" needs CUDA tensors'),
    ('cuda', True, False, True, 'needs mamba-ssm and causal-conv1d'),
    ('triton', True, True, False, 'needs triton installed'),
])
def test_backend_choice_errors(name, on_gpu, has_ext, has_triton, message):
    with pytest.raises(RuntimeError, match=message):
        ops.choose_backend(name, on_gpu, 'scan', has_ext, has_triton)


def test_dispatch_runs_torch_path_on_cpu():
    t = _inputs(1, 2, 3, 9, 4)
    out = selective_scan(**t, delta_softplus=True)
    assert torch.equal(out, selective_scan_torch(**t, delta_softplus=True))


def test_triton_backend_on_cpu_only_under_the_interpreter(monkeypatch):
    x = torch.randn(1, 2, 3)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(RuntimeError, match='"triton" needs CUDA tensors'):
        ops.resolve_backend(x, 'triton', op='scan')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert ops.resolve_backend(x, 'triton', op='scan') == 'triton'
    assert ops.resolve_backend(x, op='scan') == 'torch'  # 'auto' on CPU stays on PyTorch


@pytest.mark.parametrize('gate_last', [False, True])
def test_swiglu_mlp_dispatch_on_cpu(monkeypatch, gate_last):
    # the PyTorch path: fc2(silu(gate) * value) of fc1's halves, exactly; the Triton path asked for on CPU tensors
    # is a clear error
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    gen = torch.Generator().manual_seed(3)
    x, w1, b1 = torch.randn(4, 3, 6, generator=gen), torch.randn(74, 6, generator=gen), torch.randn(74, generator=gen)
    w2, b2 = torch.randn(5, 37, generator=gen), torch.randn(5, generator=gen)
    h = torch.nn.functional.linear(x, w1, b1)
    gate, value = (h[..., 37:], h[..., :37]) if gate_last else (h[..., :37], h[..., 37:])
    expected = torch.nn.functional.linear(torch.nn.functional.silu(gate) * value, w2, b2)
    torch.testing.assert_close(ops.swiglu_mlp(x, w1, b1, w2, b2, gate_last), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match='"triton" needs CUDA tensors'):
        ops.swiglu_mlp(x, w1, b1, w2, b2, backend='triton')


@pytest.mark.parametrize('branch_dtype', [torch.float32, torch.bfloat16])
def test_add_layer_norm_on_cpu(branch_dtype):
    """The blocks' residual add + LayerNorm: the sum in the promoted dtype (fp32 residual stream) and
    LayerNorm of that sum, with gradients, on the plain path (the fused kernel is checked by gpu_check.py)."""
    gen = torch.Generator().manual_seed(11)
    residual = torch.randn(2, 9, 24, generator=gen).requires_grad_()
    branch = torch.randn(2, 9, 24, generator=gen).to(branch_dtype).requires_grad_()
    weight = (1 + .1 * torch.randn(24, generator=gen)).requires_grad_()
    bias = torch.randn(24, generator=gen).requires_grad_()
    total, normed = ops.add_layer_norm(residual, branch, weight, bias, 1e-5)
    assert total.dtype == normed.dtype == torch.float32
    ref_total = residual.detach() + branch.detach().float()
    mean, var = ref_total.mean(-1, keepdim=True), ref_total.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
    torch.testing.assert_close(normed, (ref_total - mean) / torch.sqrt(var + 1e-5) * weight + bias)
    probe = torch.randn(2, 9, 24, generator=gen)
    grads = torch.autograd.grad((normed * probe).sum() + total.sum(), (residual, branch, weight, bias))
    ref_in = [t.detach().clone().requires_grad_() for t in (residual, branch, weight, bias)]
    ref_sum = ref_in[0] + ref_in[1].float()
    ref = F.layer_norm(ref_sum, (24,), ref_in[2], ref_in[3], 1e-5)
    ref_grads = torch.autograd.grad((ref * probe).sum() + ref_sum.sum(), ref_in)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r)


def test_layer_norm_without_branch_on_cpu():
    """branch None: the residual itself, and its LayerNorm (a block's norm1)."""
    gen = torch.Generator().manual_seed(12)
    x, weight = torch.randn(3, 4, 16, generator=gen), torch.randn(16, generator=gen)
    bias = torch.randn(16, generator=gen)
    total, normed = ops.add_layer_norm(x, None, weight, bias, 1e-6)
    assert total is x
    torch.testing.assert_close(normed, F.layer_norm(x, (16,), weight, bias, 1e-6), rtol=0, atol=0)


def test_add_layer_norm_takes_the_fused_kernel_only_without_grad(monkeypatch):
    """With gradients the block's add + LayerNorm stays on PyTorch's ops even on the Triton path; without, the Triton
    path is taken (on CPU tensors: the clear device error shows it was)."""
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    x, branch = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 8)
    weight, bias = torch.ones(8), torch.zeros(8)
    total, normed = ops.add_layer_norm(x, branch, weight, bias, 1e-5, backend='triton')
    torch.testing.assert_close(normed, F.layer_norm(x + branch, (8,), weight, bias, 1e-5), rtol=0, atol=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match='"triton" needs CUDA tensors'):
        ops.add_layer_norm(x, branch, weight, bias, 1e-5, backend='triton')


def test_add_layer_norm_traces_without_graph_break():
    """Off the fused kernel, torch.compile sees plain add + layer_norm (only the fused call is opaque)."""
    import torch._dynamo
    args = (torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(8), torch.randn(8), 1e-5)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ops.add_layer_norm)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _mixer_core_literal(xz, order, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D):
    """Each direction on its own, as the reference code runs them: permute the tokens into the direction's order,
    conv (loop over taps), projections, the step-by-step scan, permute back; mean over directions, gate."""
    batch, seqlen, _ = xz.shape
    K, d, N = A_log.shape
    R, width = dt_proj_weight.shape[-1], conv_weight.shape[-1]
    x, z = xz[..., :d], xz[..., d:]
    outs = []
    for k in range(K):
        idx = order[0][k].long() if order is not None else torch.arange(seqlen)
        xk = x[:, idx].transpose(1, 2)  # (b, d, L) in k's order
        conv = conv_bias[k][None, :, None].expand(batch, d, seqlen).clone()
        for j in range(width):
            shift = width - 1 - j
            conv[..., shift:] = conv[..., shift:] + conv_weight[k][None, :, j, None] * xk[..., :seqlen - shift]
        u = F.silu(conv)
        dt, B, C = (x_proj_weight[k] @ u).split([R, N, N], dim=1)
        delta = dt_proj_weight[k] @ dt
        y = selective_scan_sequential(u, delta, -torch.exp(A_log[k]), B[:, None], C[:, None], D[k],
                                      delta_bias=dt_proj_bias[k], delta_softplus=True)
        inverse = order[1][k].long() if order is not None else torch.arange(seqlen)
        outs.append(y[..., inverse].transpose(1, 2))
    return torch.stack(outs).mean(0) * F.silu(z)


@pytest.mark.parametrize('num_dirs, seqlen, width', [(4, 13, 4), (1, 9, 4), (4, 5, 2), (2, 30, 3)])
def test_torch_mixer_core_matches_literal(num_dirs, seqlen, width):
    """The direction-major PyTorch mixer core (gather once, shifted-add conv, batched projections, SequentialScan,
    gather back) against each direction run on its own: output and every gradient, fp32."""
    K, d, N, R, batch = num_dirs, 6, 4, 2, 2
    gen = torch.Generator().manual_seed(seqlen)
    mk = lambda *s, scale=1.: (torch.randn(*s, generator=gen) * scale).requires_grad_()  # noqa: E731
    weights = [mk(K, d, width, scale=.5), mk(K, d, scale=.5), mk(K, R + 2 * N, d, scale=.5), mk(K, d, R, scale=.5),
               mk(K, d, scale=.5), (torch.rand(K, d, N, generator=gen) + .5).log().requires_grad_(), mk(K, d)]
    xz = mk(batch, seqlen, 2 * d)
    order = None
    if K > 1:
        perm = torch.stack([torch.randperm(seqlen, generator=gen) for _ in range(K)])
        order = (perm.int(), perm.argsort(1).int())
    leaves = [xz] + weights
    grad = torch.randn(batch, seqlen, d, generator=gen)
    ours = ops.mixer_core(xz, order, ops.MixerWeights(*weights), backend='torch')
    ref = _mixer_core_literal(xz, order, *weights)
    assert _rel_err(ours, ref) < 1e-5
    for i, (a, b) in enumerate(zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(ref, leaves, grad))):
        assert _rel_err(a, b) < 1e-4, i


def test_mixer_is_the_projections_around_the_core_and_names_missing_projections():
    """``ops.mixer`` on the PyTorch path: out_proj(mixer_core(in_proj(x))) with the bundle's projections; a bundle
    without them is a clear error before any work."""
    gen = torch.Generator().manual_seed(21)
    K, d, N, R, dim, seqlen = 2, 6, 4, 2, 5, 7
    mk = lambda *s: torch.randn(*s, generator=gen) * .5  # noqa: E731
    core = (mk(K, d, 4), mk(K, d), mk(K, R + 2 * N, d), mk(K, d, R), mk(K, d), (torch.rand(K, d, N) + .5).log(),
            mk(K, d))
    w_in, w_out = mk(2 * d, dim), mk(dim, d)
    x = mk(3, seqlen, dim)
    perm = torch.stack([torch.randperm(seqlen, generator=gen) for _ in range(K)])
    order = (perm.int(), perm.argsort(1).int())
    out = ops.mixer(x, order, ops.MixerWeights(*core, in_proj_weight=w_in, out_proj_weight=w_out), backend='torch')
    ref = F.linear(ops.mixer_core(F.linear(x, w_in), order, ops.MixerWeights(*core), backend='torch'), w_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.shape == (3, seqlen, dim)
    with pytest.raises(ValueError, match='need in_proj_weight and out_proj_weight'):
        ops.mixer(x, order, ops.MixerWeights(*core), backend='torch')


@pytest.mark.parametrize('shape, dtype, tol', [((2, 2, 3, 13, 4), torch.float32, 1e-5),
                                               ((1, 4, 5, 40, 16), torch.float32, 1e-5),
                                               ((3, 1, 8, 9, 8), torch.bfloat16, 1e-2)])
def test_compiled_cpu_scan_matches_eager(monkeypatch, shape, dtype, tol):
    """The scan's steps compiled for the CPU (``ops.cpu_compile``) against the same scan run eagerly
    (TIMM_ARM_COMPILE_CPU=0) and the literal step-by-step reference: output and every gradient."""
    batch, groups, d, seqlen, d_state = shape
    gen = torch.Generator().manual_seed(seqlen * 7 + d_state)
    dim = groups * d
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    leaves = dict(u=mk(batch, dim, seqlen), delta=mk(batch, dim, seqlen), A=-torch.rand(dim, d_state, generator=gen) * 3
                  - .1, B=mk(batch, groups, d_state, seqlen), C=mk(batch, groups, d_state, seqlen), D=mk(dim))
    leaves = {k: (v.to(dtype) if k in ('u', 'delta', 'B', 'C') else v).requires_grad_() for k, v in leaves.items()}
    grad = torch.randn(batch, dim, seqlen, generator=gen).to(dtype)
    results = {}
    for mode in ('1', '0'):
        monkeypatch.setenv('TIMM_ARM_COMPILE_CPU', mode)
        out = selective_scan_torch(**leaves, delta_softplus=True)
        results[mode] = (out, torch.autograd.grad(out, list(leaves.values()), grad))
    ref = selective_scan_sequential(**{k: v.float() for k, v in leaves.items()}, delta_softplus=True)
    steps = sys.modules['timm_arm.ops.selective_scan']
    if steps._ADVANCE_AND_READ.failed:
        pytest.skip('torch.compile cannot build here (no C++ compiler?)')
    assert steps._ADVANCE_AND_READ.succeeded and steps._ADVANCE.succeeded and steps._STEP_BACK.succeeded  # compiled
    assert _rel_err(results['1'][0], results['0'][0]) < tol
    assert _rel_err(results['1'][0], ref) < tol
    for name, a, b in zip(leaves, results['1'][1], results['0'][1]):
        assert a.dtype == b.dtype and _rel_err(a, b) < tol, name


def test_cpu_softplus_matches_float64():
    """The CPU path's softplus (one compiled pass) against float64 over the whole fp32 range that matters, its
    gradient against F.softplus's."""
    from timm_arm.ops.cpu_compile import softplus
    gen = torch.Generator().manual_seed(5)
    extremes = torch.tensor([-80., -30., -17., -15., -5., -1e-6, 0., 1e-6, 5., 15., 20., 30., 1e4])
    x = torch.cat([torch.randn(4, 1000, generator=gen).mul(6).flatten(), extremes]).requires_grad_()
    ours = softplus(x)
    ref = F.softplus(x.detach().double())
    assert ((ours.double() - ref).abs() / ref).max() < 1e-6
    grad = torch.randn(x.shape, generator=gen)
    ours_grad, = torch.autograd.grad(ours, x, grad)
    x2 = x.detach().requires_grad_()
    ref_grad, = torch.autograd.grad(F.softplus(x2), x2, grad)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_cpu_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    """Where torch.compile cannot build (no C++ compiler), the first call warns once, naming the problem, and the
    function runs eagerly with the same result from then on; TIMM_ARM_COMPILE_CPU=0 never tries."""
    from timm_arm.ops import cpu_compile

    def broken_compile(fn):
        def call(*args):
            raise RuntimeError('no C++ compiler found')
        return call
    monkeypatch.setattr(cpu_compile.torch, 'compile', broken_compile)
    fused = cpu_compile.CompiledOnCpu(lambda a, b: a * b + 1)
    a, b = torch.randn(3), torch.randn(3)
    assert fused.active(a)
    with pytest.warns(RuntimeWarning, match='could not build.*no C\\+\\+ compiler'):
        torch.testing.assert_close(fused(a, b), a * b + 1)
    assert not fused.active(a)
    torch.testing.assert_close(fused(a, b), a * b + 1)  # no second warning (pytest's filter: error on warnings below)
    monkeypatch.setenv('TIMM_ARM_COMPILE_CPU', '0')
    assert not cpu_compile.CompiledOnCpu(torch.sin).active(a)
    if torch.cuda.is_available():
        monkeypatch.delenv('TIMM_ARM_COMPILE_CPU')
        assert not cpu_compile.CompiledOnCpu(torch.sin).active(a.cuda())
