""" What the AR model predicts: each image beside its next-cluster predictions, as one PNG grid.

    timm-arm-pretrain --output OUT --visualize predictions.png --data-dir DIR [--num-images 8] [--resume FILE]

The pretrainer predicts every cluster from the clusters before it, in normalised-pixel space (each patch's pixels
minus their mean, over their standard deviation). For a picture, each predicted patch is mapped back with the mean
and standard deviation of the true patch, as MAE's visualisations do: the colours come from the image, the
structure from the model. The first cluster has nothing before it and is shown as it is.
"""
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from timm_arm.models.arm_pretrain import ArmPretrainer

from .checkpoint import atomic_save

__all__ = ['predict_clusters', 'prediction_grid', 'visualize']


@torch.no_grad()
def predict_clusters(model: ArmPretrainer, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised images -> the same images with every cluster after the first replaced by the model's
    prediction of it from the clusters before (de-normalised with the true patch's mean and variance)."""
    pred = model.forward_decoder(model.forward_encoder(images)).float()
    patches = model.patchify(images.float())
    targets = model.order[model.cluster_len:]
    true = patches[:, targets]
    mean, var = true.mean(dim=-1, keepdim=True), true.var(dim=-1, keepdim=True)
    patches[:, targets] = pred * (var + model.norm_pix_eps).sqrt() + mean
    return model.unpatchify(patches)


def prediction_grid(
        images: torch.Tensor,
        predictions: torch.Tensor,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        pairs_per_row: int = 4,
        min_side: int = 128,
) -> torch.Tensor:
    """(3, H', W') image in [0, 1]: (input, prediction) pairs side by side, ``pairs_per_row`` pairs per row,
    small images enlarged (nearest) to at least ``min_side`` pixels."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    both = torch.stack([images.float(), predictions.float()], dim=1).flatten(0, 1)  # input, prediction, ...
    both = (both * std_t + mean_t).clamp(0, 1)
    factor = max(1, -(-min_side // both.shape[-2]))
    if factor > 1:
        both = F.interpolate(both, scale_factor=factor, mode='nearest')
    return make_grid(both.cpu(), nrow=2 * pairs_per_row, padding=2, pad_value=1.0)


def visualize(model: ArmPretrainer, dataset, path: str, num_images: int = 8, device: str = 'cpu') -> str:
    """Predict `num_images` images of `dataset` (PIL images), spread evenly over it, and write the grid to `path`."""
    H, W = model.img_size
    transform = create_transform((3, H, W), is_training=False, crop_pct=1.0, interpolation='bicubic')
    step = max(1, len(dataset) // num_images)
    indices = list(range(0, len(dataset), step))[:num_images]
    images = torch.stack([transform(dataset[i][0].convert('RGB')) for i in indices]).to(device)
    model = model.to(device).eval()
    grid = prediction_grid(images, predict_clusters(model, images), pairs_per_row=min(4, len(indices)))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_save(grid, path, save_fn=lambda obj, f: save_image(obj, f, format='png'))
    return path
