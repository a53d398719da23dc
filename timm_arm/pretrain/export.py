""" Export the pretrained encoder as a timm folder: model.safetensors + config.json, written by timm's own writer.

The weights are the 1-direction encoder in its pretraining form (no `encoder.` prefix, no decoder). config.json's
model_args describe its shape only, so `local-dir:` builds the 4-direction classifier from it, and
arm_mamba.checkpoint_filter_fn copies the direction into all four, resamples the position embedding (a zero class
position in the middle) and starts a fresh head:

    timm.create_model('local-dir:/path/to/export', pretrained=True, num_classes=10)
    timm.create_model('arm_mamba_base', pretrained=True, pretrained_cfg_overlay=dict(file='.../model.safetensors'))
"""
import os
from typing import Any, Dict, Optional

import timm

from timm_arm.models.arm_mamba import ENCODER_FORM
from timm_arm.models.arm_pretrain import ArmPretrainer
from timm_arm.serialization import write_timm_folder

__all__ = ['export_encoder']


def export_encoder(
        model: ArmPretrainer,
        folder: str,
        model_name: str,
        extra_model_args: Optional[Dict[str, Any]] = None,
) -> str:
    """Write `folder` (model.safetensors, config.json) atomically; returns the weights path."""
    encoder = model.encoder
    shape = dict(embed_dim=encoder.embed_dim, depth=len(encoder.blocks),
                 patch_size=list(encoder.patch_embed.patch_size), img_size=list(encoder.patch_embed.img_size))
    in_chans = encoder.patch_embed.proj.in_channels
    if in_chans != 3:
        shape['in_chans'] = in_chans
    shape.update(extra_model_args or {})
    # the same encoder built by timm's factory (pretrained_cfg, data config), holding the trained weights
    target = timm.create_model(model_name, pretrained=False, num_classes=0, device='meta', **ENCODER_FORM, **shape)
    target.load_state_dict({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, assign=True)
    gh, gw = encoder.patch_embed.grid_size
    target.pretrained_cfg = {
        **target.pretrained_cfg, 'num_classes': 0, 'input_size': (in_chans, *shape['img_size']), 'pool_size': (gh, gw),
        'crop_pct': 1.0, 'tag': None, 'hf_hub_id': None, 'architecture': model_name}
    pretraining = dict(method='ARM autoregressive', cluster_size=list(model.cluster_size),
                       tap_layers=list(model.tap_layers), img_size=list(model.img_size))
    write_timm_folder(target, folder, shape, model_config={'pretraining': pretraining})
    return os.path.join(folder, 'model.safetensors')
