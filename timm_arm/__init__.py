""" timm-arm: ARM (Autoregressive Pretraining with Mamba in Vision) for timm.

Importing the package registers arm_mamba_{tiny,base,large,huge} in timm's model registry.
"""
import argparse

import torch

from .models import ArmMamba, checkpoint_filter_fn
from .ops import get_backend, set_backend

__version__ = '0.1.0'

# The reference code's checkpoints carry their argparse.Namespace of training arguments. Allow exactly that
# class through torch.load(weights_only=True) so that they load without arbitrary unpickling.
torch.serialization.add_safe_globals([argparse.Namespace])
