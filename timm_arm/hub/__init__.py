""" Pretrained weights on the Hugging Face Hub: convert the reference code's checkpoints (or ours) into
Hub-ready safetensors folders, verify them through timm, publish them.

    timm-arm-hub convert checkpoint-best.pth out/arm_mamba_base.arm_in1k --model arm_mamba_base.arm_in1k
    timm-arm-hub verify out/arm_mamba_base.arm_in1k --source checkpoint-best.pth
    timm-arm-hub publish out/arm_mamba_base.arm_in1k timm-arm/arm_mamba_base.arm_in1k --dry-run
"""
from .cli import main
from .export import ENCODER_FORM, PAPER_RESULTS, convert, model_card, verify
from .source import CheckpointInfo, HubError, describe_state_dict, read_checkpoint
from .upload import plan_upload, publish

__all__ = ['convert', 'verify', 'publish', 'plan_upload', 'read_checkpoint', 'describe_state_dict', 'model_card',
           'CheckpointInfo', 'HubError', 'ENCODER_FORM', 'PAPER_RESULTS', 'main']
