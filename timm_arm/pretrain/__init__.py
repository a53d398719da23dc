""" ARM autoregressive pretraining: training loop, checkpoints, export (CLI: timm-arm-pretrain). """
from .checkpoint import atomic_save, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .export import export_encoder

