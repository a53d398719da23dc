import argparse
import time

import pytest
import torch
from reference_impl import reference_forward, to_reference_layout
from safetensors.torch import save_file

import timm

from timm_arm.models import ArmMamba, checkpoint_filter_fn, resample_pos_embed, scan_orders

SMALL = dict(embed_dim=32, depth=2, img_size=32, patch_size=8)  # 4 x 4 patches, 17 tokens


def _perturbed(model):
    """Random weights everywhere, so that any mix-up of directions, gates or norms shows in the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if 'A_log' in name or name.endswith('.D') else 0.1))
    return model.eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('name, millions', [
    ('arm_mamba_base', 85.0), ('arm_mamba_large', 297.0), ('arm_mamba_huge', 662.7)])
def test_published_parameter_counts(name, millions):
    model = timm.create_model(name, device='meta')
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.005
    assert all(p.device.type == 'meta' for p in model.parameters())


def test_scan_orders_hand_computed():
    # 2 x 3 grid, patches p0..p5 (row-major), class token at index 3: tokens [p0 p1 p2 cls p3 p4 p5]
    order, inverse = scan_orders((2, 3), 4, 3, torch.device('cpu'))
    # column-major patch walk: p0 p3 p1 p4 p2 p5 -> token positions 0 4 1 5 2 6, cls kept at step 3
    expected = torch.tensor([
        [0, 1, 2, 3, 4, 5, 6],
        [6, 5, 4, 3, 2, 1, 0],
        [0, 4, 1, 3, 5, 2, 6],
        [6, 2, 5, 3, 1, 4, 0],
    ])
    assert torch.equal(order, expected)
    assert order.dtype == inverse.dtype == torch.int32  # the kernels' index type: no cast per layer
    assert torch.equal(torch.gather(order.long(), 1, inverse.long()), torch.arange(7).expand(4, 7))
    assert scan_orders((2, 3), 1, None, torch.device('cpu')) is None
    with pytest.raises(ValueError, match='num_directions'):
        scan_orders((2, 3), 3, None, torch.device('cpu'))


@pytest.mark.parametrize('img_size, patch_size', [(32, 8), (40, 8), (24, 8)])
def test_logits_match_reference_semantics(img_size, patch_size):
    model = _perturbed(timm.create_model('arm_mamba_tiny', embed_dim=32, depth=2, img_size=img_size,
                                         patch_size=patch_size, num_classes=7))
    sd = to_reference_layout(model.state_dict())
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert _rel(model(x), reference_forward(sd, x, patch_size)) < 1e-4


def test_reference_checkpoint_loads_through_pretrained_cfg(tmp_path):
    source = _perturbed(timm.create_model('arm_mamba_tiny', num_classes=5, **SMALL))
    ref_sd = to_reference_layout(source.state_dict())
    path = tmp_path / 'checkpoint-best.pth'
    torch.save({'model': ref_sd, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3)}, path)
    model = timm.create_model(
        'arm_mamba_tiny', pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path), num_classes=5),
        **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(model(x), reference_forward(ref_sd, x, 8)) < 1e-4
        assert torch.allclose(model(x), source(x), rtol=1e-5, atol=1e-6)


def test_one_direction_pretraining_checkpoint_converts(tmp_path):
    # a pretraining encoder: 1 direction, no class token, fixed sin-cos pos embed on a 3 x 3 grid
    encoder = _perturbed(ArmMamba(img_size=24, patch_size=8, embed_dim=32, depth=2, num_directions=1,
                                  class_token=False, pos_embed='sincos', num_classes=0, global_pool=''))
    sd = {k: v for k, v in encoder.state_dict().items()}
    sd['decoder_blocks.0.attn.q.weight'] = torch.randn(4, 4)  # a decoder key must be dropped
    path = tmp_path / 'encoder.safetensors'
    save_file({'encoder.' + k: v.contiguous() for k, v in sd.items() if not k.startswith('decoder')}, path)

    model = timm.create_model('arm_mamba_tiny', pretrained=True, num_classes=3, **SMALL,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=0))
    msd = model.state_dict()
    for name in ('conv_weight', 'x_proj_weight', 'dt_proj_weight', 'dt_proj_bias', 'A_log', 'D'):
        key = f'blocks.1.mixer.{name}'
        assert msd[key].shape[0] == 4
        for k in range(4):
            assert torch.equal(msd[key][k], sd[key][0])
    pos = msd['pos_embed']
    assert pos.shape == (1, 17, 32)
    assert torch.equal(pos[0, 8], torch.zeros(32))  # class position: zero, in the middle
    expected = resample_pos_embed(sd['pos_embed'], (4, 4), (3, 3))
    assert torch.allclose(torch.cat([pos[:, :8], pos[:, 9:]], 1), expected)
    assert torch.equal(msd['blocks.0.mlp.fc1.weight'], sd['blocks.0.mlp.fc1.weight'])


def test_other_architecture_checkpoint_is_refused(tmp_path):
    other = timm.create_model('arm_mamba_tiny', embed_dim=48, depth=3, img_size=32, patch_size=8)
    path = tmp_path / 'other.safetensors'
    save_file(other.state_dict(), path)
    with pytest.raises(RuntimeError, match=r'(?s)does not fit.*unexpected \(\d+\): blocks\.2.*shape mismatch'):
        timm.create_model('arm_mamba_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    resnet = {'conv1.weight': torch.randn(8, 3, 7, 7), 'fc.weight': torch.randn(10, 8)}
    with pytest.raises(RuntimeError, match=r'unexpected \(2\): conv1\.weight, fc\.weight'):
        checkpoint_filter_fn(resnet, timm.create_model('arm_mamba_tiny', **SMALL))


def test_bad_input_errors():
    model = timm.create_model('arm_mamba_tiny', **SMALL)
    with pytest.raises(AssertionError, match=r'Input height \(48\) doesn.t match model \(32\)'):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(RuntimeError, match='expected input.* to have 3 channels, but got 1'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match='not_an_arg'):
        timm.create_model('arm_mamba_tiny', not_an_arg=1)
    with pytest.raises(ValueError, match='global_pool'):
        timm.create_model('arm_mamba_tiny', global_pool='token')


def test_small_variant_from_kwargs_and_in_chans():
    model = timm.create_model('arm_mamba_large', embed_dim=64, depth=2, img_size=64, in_chans=1, num_classes=4)
    assert len(model.blocks) == 2 and model.embed_dim == 64
    assert model.blocks[0].mixer.dt_rank == 4 and model.blocks[0].mixer.x_proj_weight.shape == (4, 4 + 32, 64)
    out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 4)


def test_dynamic_img_size_matches_resampled_model():
    model = _perturbed(timm.create_model('arm_mamba_tiny', dynamic_img_size=True, **SMALL))
    x = torch.randn(1, 3, 48, 40)
    fixed = timm.create_model('arm_mamba_tiny', **dict(SMALL, img_size=(48, 40))).eval()
    fixed.load_state_dict(checkpoint_filter_fn(model.state_dict(), fixed))
    with torch.no_grad():
        assert torch.allclose(model(x), fixed(x), atol=1e-5)
        feats = model.forward_features(x)
    assert feats.shape == (1, 6, 5, 32)
    assert fixed.pos_embed.shape == (1, 31, 32)


def test_set_input_size_keeps_class_position():
    model = timm.create_model('arm_mamba_tiny', **SMALL)
    cls_pos = model.pos_embed[0, 8].clone()
    model.set_input_size(img_size=48)
    assert model.pos_embed.shape == (1, 37, 32) and torch.equal(model.pos_embed[0, 18], cls_pos)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 1000)


def test_head_pools_patch_tokens_only():
    model = _perturbed(timm.create_model('arm_mamba_tiny', **SMALL))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, 4, 4, 32)
        assert torch.allclose(pre, feats.mean((1, 2)), atol=1e-6)
        assert torch.allclose(model(x), model.head.fc(pre), atol=1e-5)
        final, inter = model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
    assert torch.allclose(final, feats, atol=1e-6)
    assert inter[0][0].shape == (2, 32, 4, 4) and inter[0][1].shape == (2, 32)


def test_intermediates_features_only_and_prune():
    torch.manual_seed(0)
    model = timm.create_model('arm_mamba_tiny', **dict(SMALL, depth=4)).eval()
    torch.manual_seed(0)
    feat_model = timm.create_model('arm_mamba_tiny', features_only=True, out_indices=(1, 3), **dict(SMALL, depth=4))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        inter = model.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt='NHWC')
        feats = feat_model(x)
    assert [f.shape for f in inter] == [(1, 4, 4, 32)] * 2
    assert [f.shape for f in feats] == [(1, 32, 4, 4)] * 2
    assert feat_model.feature_info.channels() == [32, 32]
    assert torch.allclose(feats[1], inter[1].permute(0, 3, 1, 2), atol=1e-5)
    kept = model.prune_intermediate_layers(indices=(1,), prune_norm=True)
    assert kept == [1] and len(model.blocks) == 2 and model.num_classes == 0


def test_grad_checkpointing_same_output_and_grads():
    model = _perturbed(timm.create_model('arm_mamba_tiny', **SMALL)).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.square().mean().backward()
    assert torch.allclose(out, out2, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_bf16_and_no_weight_decay_and_groups():
    model = timm.create_model('arm_mamba_tiny', **SMALL).to(torch.bfloat16)
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model.float(), 'adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    for n in ('blocks.0.mixer.A_log', 'blocks.1.mixer.D', 'blocks.0.mixer.dt_proj_bias', 'pos_embed', 'cls_token'):
        assert n in names
    assert 'blocks.0.mixer.x_proj_weight' not in names and 'blocks.0.mixer.in_proj.weight' not in names


def test_training_step_reduces_loss():
    model = timm.create_model('arm_mamba_tiny', num_classes=3, **SMALL).train()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize('dim, seed, gate_last', [(20, 0, False), (1024, 1, False), (36, 2, False), (20, 3, True)])
def test_aligned_swiglu_equals_timm_glumlp(dim, seed, gate_last):
    # ARM's SwiGLU width dim * 8 // 3 (2730 for ARM-L; 53 for 20; 96 for 36, already aligned) is padded to a
    # multiple of 8 on GPU paths (the Triton path's fused MLP is checked against GluMlp, padded widths included, in
    # tests/test_triton_kernels.py); outputs and every gradient must be timm's GluMlp's
    from timm.layers import GluMlp

    from timm_arm.models.arm_mamba import AlignedGluMlp
    hidden = int(dim * 4 * 2 / 3)
    torch.manual_seed(seed)
    mlp = AlignedGluMlp(dim, 2 * hidden, act_layer=torch.nn.SiLU, gate_last=gate_last)
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        mlp.fc2.bias.normal_()
    x = torch.randn(2, 9, dim)
    results = []
    for forward in (mlp.forward, lambda t: GluMlp.forward(mlp, t)):
        xi = x.clone().requires_grad_()
        out = forward(xi)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
        results.append([out.detach(), xi.grad] + [p.grad for p in mlp.parameters()])
        mlp.zero_grad(set_to_none=True)
    for ours, timms in zip(*results):
        assert ours.shape == timms.shape
        torch.testing.assert_close(ours, timms, rtol=1e-5, atol=1e-6)
    assert isinstance(timm.create_model('arm_mamba_large', device='meta').blocks[0].mlp, AlignedGluMlp)


def test_wrapped_or_hooked_linears_are_called():
    # the mixer and the MLP compute their Linears from the weights (one fused op on GPU) only while those are
    # plain, hook-free nn.Linear modules: a forward hook (feature probes, adapters) must still fire, and a wrapped
    # module (LoRA-style) must be called, with the same results as the fused path gives without it
    torch.manual_seed(0)
    model = ArmMamba(**SMALL, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    seen = []
    for name in ('blocks.0.mixer.in_proj', 'blocks.0.mixer.out_proj', 'blocks.1.mlp.fc1', 'blocks.1.mlp.fc2'):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.append(name))
    hooked = model(x)
    assert seen == ['blocks.0.mixer.in_proj', 'blocks.0.mixer.out_proj', 'blocks.1.mlp.fc1', 'blocks.1.mlp.fc2']
    torch.testing.assert_close(hooked, plain)

    class Scaled(torch.nn.Linear):  # a Linear subclass changes what the layer computes
        def forward(self, t):
            return 2 * super().forward(t)
    block = model.blocks[0]
    scaled = Scaled(block.mlp.fc2.in_features, block.mlp.fc2.out_features)
    scaled.load_state_dict(block.mlp.fc2.state_dict())
    h = torch.randn(2, 5, block.mlp.fc1.in_features)
    expected = 2 * block.mlp(h)
    block.mlp.fc2 = scaled
    torch.testing.assert_close(block.mlp(h), expected, rtol=1e-5, atol=1e-5)


def test_scan_orders_cached_under_inference_mode_still_train():
    # the orders are cached per grid; a first call under torch.inference_mode must not cache inference tensors
    # that a later training step saves for backward
    scan_orders.cache_clear()
    model = ArmMamba(**SMALL, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    order, inverse = scan_orders((4, 4), 4, 8, torch.device('cpu'))
    assert not order.is_inference() and not inverse.is_inference()
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pretrained_unpublished_tag_fails_fast_offline(tmp_path, monkeypatch):
    """pretrained=True on a registered tag whose weights are not in the (empty) cache, offline: an error in well
    under a second naming the repo, the reason and the ways to get the weights, instead of Hub retries."""
    from huggingface_hub import constants

    from timm_arm.models._weights import PretrainedUnavailable
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(PretrainedUnavailable) as e:
        timm.create_model('arm_mamba_huge', pretrained=True, device='meta')
    assert time.perf_counter() - start < 1
    message = str(e.value)
    for text in ('arm_mamba_huge.arm_in1k', 'Hub repo timm-arm/arm_mamba_huge.arm_in1k', 'offline (HF_HUB_OFFLINE=1)',
                 'timm-arm-hub convert CHECKPOINT out/arm_mamba_huge.arm_in1k', "local-dir:",
                 "pretrained_cfg_overlay=dict(file='CHECKPOINT')", 'No tag is published on the Hub yet.'):
        assert text in message, text


def test_pretrained_file_problems_named_before_building(tmp_path):
    model = timm.create_model('arm_mamba_tiny', **SMALL)
    weights = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    torn = tmp_path / 'torn.safetensors'
    torn.write_bytes(weights.read_bytes()[:100])
    from timm_arm.models._weights import PretrainedUnavailable
    for file, text in ((torn, 'torn.safetensors: not a readable safetensors file, truncated or corrupt'),
                       (tmp_path / 'missing.pth', 'missing.pth: no such file')):
        with pytest.raises(PretrainedUnavailable, match=text):
            timm.create_model('arm_mamba_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **SMALL)
    # another patch size: the filter's report, not a raw size mismatch from load_state_dict
    with pytest.raises(RuntimeError, match=r'shape mismatch \(1\): patch_embed\.proj\.weight: checkpoint '
                                           r'\(32, 3, 8, 8\) vs model \(32, 3, 4, 4\)'):
        timm.create_model('arm_mamba_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                          **dict(SMALL, patch_size=4))
