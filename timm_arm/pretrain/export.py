""" Export the pretrained encoder as a timm checkpoint: model.safetensors + config.json.

The weights are the bare 1-direction encoder state dict (no `encoder.` prefix, no decoder). Loaded into any
ArmMamba, timm applies arm_mamba.checkpoint_filter_fn: the forward direction is copied into every direction,
the position embedding resampled (zero class position in the middle), and the head starts fresh:

    timm.create_model('arm_mamba_base', pretrained=True, pretrained_cfg_overlay=dict(file='.../model.safetensors'))
    timm.create_model('local-dir:/path/to/export')  # same, architecture and preprocessing from config.json
"""
import json
import os
from typing import Any, Dict, Optional

import safetensors.torch

from timm.models import get_pretrained_cfg
from timm.models._pretrained import filter_pretrained_cfg

from timm_arm.models.arm_pretrain import ArmPretrainer

from .checkpoint import atomic_save

__all__ = ['export_encoder']


def export_encoder(
        model: ArmPretrainer,
        folder: str,
        model_name: str,
        extra_model_args: Optional[Dict[str, Any]] = None,
) -> str:
    """Write `folder`/model.safetensors and `folder`/config.json; returns the weights path.

    config.json follows timm's save_for_hf layout. Its model_args describe the encoder's shape only (not its
    1-direction pretraining form), so `local-dir:` builds the 4-direction classifier, with num_classes 0.
    """
    os.makedirs(folder, exist_ok=True)
    encoder = model.encoder
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in encoder.state_dict().items()}
    weights = os.path.join(folder, 'model.safetensors')
    atomic_save(tensors, weights, save_fn=lambda obj, f: f.write(safetensors.torch.save(obj)))

    H, W = encoder.patch_embed.img_size
    model_args = dict(embed_dim=encoder.embed_dim, depth=len(encoder.blocks),
                      patch_size=list(encoder.patch_embed.patch_size))
    model_args.update(extra_model_args or {})
    cfg = None
    for tag in ('arm_in1k_ar', ''):
        try:
            cfg = get_pretrained_cfg(f'{model_name}.{tag}' if tag else model_name)
        except Exception:
            cfg = None
        if cfg is not None:
            break
    pretrained_cfg = filter_pretrained_cfg(cfg.to_dict(), remove_source=True, remove_null=True) if cfg else {}
    gh, gw = encoder.patch_embed.grid_size
    pretrained_cfg.update(
        num_classes=0, input_size=(encoder.patch_embed.proj.in_channels, H, W), pool_size=(gh, gw), crop_pct=1.0,
        custom_load=False)
    pretrained_cfg.pop('hf_hub_id', None)
    pretrained_cfg.pop('tag', None)
    pretrained_cfg.pop('architecture', None)
    config = {
        'architecture': model_name,
        'num_classes': 0,
        'num_features': encoder.embed_dim,
        'model_args': model_args,
        'pretrained_cfg': pretrained_cfg,
        'pretraining': {
            'method': 'ARM autoregressive',
            'cluster_size': list(model.cluster_size),
            'tap_layers': list(model.tap_layers),
            'img_size': [H, W],
        },
    }
    atomic_save(config, os.path.join(folder, 'config.json'),
                save_fn=lambda obj, f: f.write(json.dumps(obj, indent=2).encode()))
    return weights
