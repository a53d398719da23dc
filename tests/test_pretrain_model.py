"""ArmPretrainer: cluster order, block-causal mask, causality, loss, taps, and that it can learn."""
import pytest
import torch

from timm.optim import create_optimizer_v2

from timm_arm.models.arm_pretrain import (
    ArmPretrainer,
    block_causal_mask,
    cluster_order,
    create_pretrainer,
    default_tap_layers,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, cluster_size=2, decoder_embed_dim=32,
            decoder_num_heads=2)


def _tiny(**kwargs) -> ArmPretrainer:
    torch.manual_seed(0)
    return ArmPretrainer(**dict(TINY, **kwargs))


def test_cluster_order_hand_computed():
    # 4 x 4 patch grid, 2 x 2 clusters: row-major over clusters, row-major inside a cluster
    assert cluster_order((4, 4), (2, 2)).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # non-square grid and clusters: 2 x 6 grid, 1 x 3 clusters
    assert cluster_order((2, 6), (1, 3)).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    # 4 x 4 grid, 2 x 4 clusters
    assert cluster_order((4, 4), (2, 4)).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    with pytest.raises(ValueError, match='not divisible'):
        cluster_order((4, 6), (4, 4))


def test_mask_visible_patches_hand_computed():
    """For every query (a patch of clusters 1..3), the encoder patches it may attend to: all earlier clusters."""
    order = cluster_order((4, 4), (2, 2))
    mask = block_causal_mask(4, 4)
    assert mask.shape == (12, 12) and mask.dtype == torch.bool
    encoder_patches = order[:-1].flatten()  # encoder reads clusters 0..2
    targets = order[1:].flatten()  # queries predict clusters 1..3
    visible = {int(t): sorted(encoder_patches[mask[q]].tolist()) for q, t in enumerate(targets)}
    cluster0, cluster1 = [0, 1, 4, 5], [2, 3, 6, 7]
    for t in (2, 3, 6, 7):
        assert visible[t] == cluster0
    for t in (8, 9, 12, 13):
        assert visible[t] == sorted(cluster0 + cluster1)
    for t in (10, 11, 14, 15):
        assert visible[t] == sorted(cluster0 + cluster1 + [8, 9, 12, 13])
    # the model registers exactly this order and mask
    model = _tiny()
    assert model.order.tolist() == order.flatten().tolist()
    assert torch.equal(model.attn_mask, mask)


def test_predictions_are_block_causal():
    """Prediction of cluster j depends on pixels of clusters < j only; the last cluster is never read."""
    model = _tiny().eval()
    images = torch.randn(2, 3, 32, 32)
    P = model.cluster_len
    with torch.no_grad():
        base = model.forward_decoder(model.forward_encoder(images))
        for c, (r, col) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):  # clusters of 2x2 patches of 8 px
            changed = images.clone()
            changed[:, :, r:r + 16, col:col + 16] += 1.0
            pred = model.forward_decoder(model.forward_encoder(changed))
            diff = (pred - base).abs().amax(dim=(0, 2)).view(-1, P).amax(-1)  # per predicted cluster 1..3
            for j in range(1, 4):
                if j <= c:
                    assert diff[j - 1] == 0, f'prediction of cluster {j} saw cluster {c}'
                else:
                    assert diff[j - 1] > 1e-6, f'prediction of cluster {j} ignores cluster {c}'


def test_loss_is_mse_to_normalised_pixels():
    model = _tiny()
    images = torch.randn(2, 3, 32, 32)
    pred, target = model.forward_pred(images)
    assert pred.shape == target.shape == (2, 12, 8 * 8 * 3)
    # hand-made target for the first query: patch 2 = rows 0..7, cols 16..23, values ordered (row, col, channel)
    patch = images[0, :, 0:8, 16:24].permute(1, 2, 0).reshape(-1)
    expected = (patch - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
    torch.testing.assert_close(target[0, 0], expected)
    torch.testing.assert_close(model(images), ((pred - target) ** 2).mean())
    torch.testing.assert_close(model.unpatchify(model.patchify(images)), images)


def test_tap_layers_and_arguments():
    assert default_tap_layers(12) == (6, 8, 10, 12)
    assert default_tap_layers(24) == (12, 16, 20, 24)
    assert default_tap_layers(4) == (2, 3, 3, 4)
    model = _tiny(depth=3, tap_layers=(1, 3), decoder_depth=2, decoder_embed_dim=16)
    feats = model.forward_encoder(torch.randn(1, 3, 32, 32))
    assert len(feats) == 2 and feats[0].shape == (1, 12, 32)
    assert model.enc2dec.weight.shape == (2 * 16, 2 * 32) and len(model.decoder_blocks) == 2
    # non-square image, 2 x 4 clusters
    model = _tiny(img_size=(32, 64), cluster_size=(2, 4))
    assert model.num_clusters == 4 and model.cluster_len == 8
    assert model(torch.randn(1, 3, 32, 64)).ndim == 0
    with pytest.raises(ValueError, match='divisible by patch size x cluster size'):
        _tiny(img_size=40)
    with pytest.raises(ValueError, match='tap_layers'):
        _tiny(tap_layers=(1, 2, 3, 4))  # depth 2


def test_factory_uses_variant_and_state_dict_layout():
    model = create_pretrainer('arm_mamba_tiny', img_size=32, patch_size=8, cluster_size=2, decoder_embed_dim=32,
                              decoder_num_heads=2)
    assert model.encoder.embed_dim == 192 and len(model.encoder.blocks) == 12  # arm_mamba_tiny: 192 x 12
    assert model.tap_layers == (6, 8, 10, 12)  # the paper's taps for 12 layers
    assert model.encoder.num_directions == 1 and model.encoder.cls_token is None
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    keys = model.state_dict().keys()
    assert 'encoder.blocks.0.mixer.A_log' in keys and 'encoder.pos_embed' in keys
    assert not any(k.startswith(('order', 'attn_mask')) for k in keys)  # buffers are rebuilt, not stored
    base = create_pretrainer('arm_mamba_base', device='meta')
    assert base.tap_layers == (6, 8, 10, 12) and base.encoder.patch_embed.grid_size == (12, 12)
    assert base.num_clusters == 9 and base.cluster_len == 16 and base.attn_mask.shape == (128, 128)


def test_no_weight_decay_groups():
    model = _tiny()
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    decay = {names[id(p)] for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert {'query_token', 'encoder.blocks.0.mixer.A_log', 'encoder.blocks.1.mixer.dt_proj_bias'} <= no_decay
    assert 'encoder.blocks.0.mixer.x_proj_weight' in decay and 'enc2dec.weight' in decay
    assert not any(n.startswith(('encoder.pos_embed', 'decoder_pos_embed', 'encoder.norm.')) for n in no_decay | decay)
    assert all(g['betas'] == (0.9, 0.95) for g in optimizer.param_groups)


def test_overfits_a_fixed_batch():
    torch.set_num_threads(1)
    model = _tiny()
    images = torch.randn(4, 3, 32, 32)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=3e-3, weight_decay=0., betas=(0.9, 0.95))
    losses = []
    for _ in range(100):
        loss = model(images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
