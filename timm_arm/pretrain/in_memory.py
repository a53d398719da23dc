""" Pretraining data held in memory: a small dataset decoded once, kept on the training device, augmented there.

A 2-10 M parameter encoder on 32-96 px images trains faster than worker processes can decode and crop JPEGs, so for
datasets that fit (CIFAR-10 is 150 MB as uint8) the pretrainer keeps every image as one uint8 (N, H, W, C) tensor
on its device and builds each batch there: gather, RandomResizedCrop + horizontal flip (as a pair of per-sample
resize matrices, so the crop, the resize and the flip are two batched matmuls), clamp, normalise.

The crops follow torchvision's RandomResizedCrop exactly (same sampling, same bicubic antialiased resize of the
crop; the CPU path uses PIL's, which differs by rounding to uint8). Each epoch's crop and flip of every image are
drawn up front from a generator seeded by (seed, epoch), indexed by image: a resumed run, and a run on another
number of GPUs at the same global batch, see the same pixels, as with the worker-based path.
"""
import logging
import math
from functools import lru_cache
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .data import DataError, ResumableSampler

__all__ = ['decode_images', 'sample_crops', 'crop_resize_flip', 'InMemoryLoader', 'InMemoryError']

_logger = logging.getLogger(__name__)


class InMemoryError(DataError):
    """The images cannot be held in memory (over the budget, or not all of one size)."""


class _AsArray:
    """Dataset view returning (uint8 HWC array, index) per image: what the decoding workers send back."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, _ = self.dataset[index]
        return np.asarray(img.convert('RGB'), dtype=np.uint8), index


def _filename(dataset: Dataset, index: int) -> str:
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'filename'):
        return str(reader.filename(index))
    return f'#{index}'


def decode_images(dataset: Dataset, max_bytes: int, workers: int = 4) -> torch.Tensor:
    """Decode every image of a map-style dataset (PIL images, no transform) into one uint8 (N, H, W, 3) tensor.

    The size of the whole set is checked against ``max_bytes`` from the first image before anything else is
    decoded; an image whose size differs from the first one's stops the decoding with its file name.
    """
    n = len(dataset)
    first = _AsArray(dataset)[0][0]
    shape = first.shape
    need = n * first.nbytes
    if need > max_bytes:
        raise InMemoryError(
            f'{n} images of {shape[1]}x{shape[0]} px need {need / 2 ** 30:.2f} GiB as uint8, over the in-memory '
            f'budget of {max_bytes / 2 ** 30:.2f} GiB (--in-memory-max-gb). Raise the budget or use '
            f'--in-memory off (images decoded by worker processes).')
    images = torch.empty((n, *shape), dtype=torch.uint8)
    loader = DataLoader(_AsArray(dataset), batch_size=256, num_workers=workers, collate_fn=list)
    for batch in loader:
        for array, index in batch:
            if array.shape != shape:
                raise InMemoryError(
                    f'In-memory data needs images of one size: {_filename(dataset, index)} is '
                    f'{array.shape[1]}x{array.shape[0]} px, the first image {shape[1]}x{shape[0]} px. Resize the '
                    f'dataset to one size or use --in-memory off.')
            images[index].numpy()[...] = array
    return images


def sample_crops(
        uniforms: torch.Tensor,
        height: int,
        width: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for many images at once, from given uniform draws.

    Args:
        uniforms: (n, 22) float64 in [0, 1): per image, 10 attempts x (area, log aspect ratio), then top, left.
        height, width: Image size.

    Returns:
        (n, 4) int64: top, left, crop height, crop width. As torchvision: the first of 10 attempts whose crop fits,
        else the central crop with the aspect ratio clamped into ``ratio``.
    """
    n = uniforms.shape[0]
    attempts = uniforms[:, :20].view(n, 10, 2)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target_area = height * width * (scale[0] + attempts[..., 0] * (scale[1] - scale[0]))
    aspect = torch.exp(log_ratio[0] + attempts[..., 1] * (log_ratio[1] - log_ratio[0]))
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    found = fits.any(dim=1)
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    top = torch.where(found, (uniforms[:, 20] * (height - h + 1)).long(), (height - fh) // 2)
    left = torch.where(found, (uniforms[:, 21] * (width - w + 1)).long(), (width - fw) // 2)
    return torch.stack([top, left, h, w], dim=1)


@lru_cache(maxsize=16)
def _resize_table(length: int, size: int, mode: str, device: torch.device) -> torch.Tensor:
    """(length + 1, size, length) on `device`: entry c holds, in its first c columns, the (size x c) matrix that
    resizes c pixels to ``size`` exactly as F.interpolate(mode, antialias=True) does (interpolate applied to an
    identity). Cached per device: no host-to-device copy per batch."""
    table = torch.zeros(length + 1, size, length, dtype=torch.float64)
    for c in range(1, length + 1):
        # channel k: a unit impulse at pixel k of a 2-pixel-wide column (the antialiased kernels return zeros
        # for a 1-pixel-wide input); the second dimension keeps its size, so it is left unchanged
        eye = torch.eye(c, dtype=torch.float64).view(1, c, c, 1).expand(1, c, c, 2)
        resized = F.interpolate(eye, size=(size, 2), mode=mode, antialias=True, align_corners=False)
        table[c, :, :c] = resized[0, :, :, 0].t()
    return table.float().to(device)


@lru_cache(maxsize=16)
def _normalisation(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) in pixel units as (1, C, 1, 1) tensors on `device`, made once."""
    as_pixels = lambda v: (torch.tensor(v) * 255).view(1, -1, 1, 1).to(device)  # noqa: E731
    return as_pixels(mean), as_pixels(std)


def _resize_matrices(table: torch.Tensor, start: torch.Tensor, length: torch.Tensor, full: int) -> torch.Tensor:
    """(B, size, full) matrices that read pixels start .. start + length - 1 of a line and resize them."""
    rel = torch.arange(full, device=start.device) - start[:, None]  # (B, full) position inside the crop
    inside = (rel >= 0) & (rel < length[:, None])
    rows = table[length]  # (B, size, full), the crop's matrix in its first `length` columns
    gathered = rows.gather(2, rel.clamp(0, full - 1)[:, None, :].expand(-1, rows.shape[1], -1))
    return gathered * inside[:, None, :]


def crop_resize_flip(
        images: torch.Tensor,
        crops: torch.Tensor,
        flips: torch.Tensor,
        size: int,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = 'bicubic',
) -> torch.Tensor:
    """Crop, resize (antialiased, as torchvision's resized_crop), flip and normalise a batch.

    Args:
        images: (B, H, W, C) uint8 (or float in 0..255).
        crops: (B, 4) top, left, height, width; flips: (B,) bool, horizontal flip after the resize.

    Returns:
        (B, C, size, size) float32, clamped to the pixel range before normalisation.
    """
    B, H, W, C = images.shape
    device = images.device
    crops = crops.to(device)
    rows = _resize_matrices(_resize_table(H, size, interpolation, device), crops[:, 0], crops[:, 2], H)
    cols = _resize_matrices(_resize_table(W, size, interpolation, device), crops[:, 1], crops[:, 3], W)
    cols = torch.where(flips.to(device)[:, None, None], cols.flip(1), cols)
    x = images.permute(0, 3, 1, 2).float()  # (B, C, H, W)
    x = rows[:, None] @ x @ cols[:, None].transpose(-1, -2)  # (B, C, size, size)
    mean, std = _normalisation(tuple(mean), tuple(std), device)
    return (x.clamp_(0, 255) - mean) / std


class InMemoryLoader:
    """Batches of augmented images from a uint8 image tensor on the training device.

    Same interface and order as the worker-based path: the samples of each epoch follow ResumableSampler
    (shuffled by (seed, epoch), split over ranks, drop_last), and ``set_epoch(epoch, start)`` resumes after
    ``start`` samples of this rank. Iterating yields (micro_batch, C, img_size, img_size) float32 tensors.
    """

    def __init__(
            self,
            images: torch.Tensor,
            batch_size: int,
            img_size: int,
            num_replicas: int = 1,
            rank: int = 0,
            seed: int = 0,
            scale: Tuple[float, float] = (0.2, 1.0),
            ratio: Tuple[float, float] = (3 / 4, 4 / 3),
            mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        self.images = images
        self.batch_size = batch_size
        self.img_size = img_size
        self.seed = seed
        self.scale, self.ratio, self.mean, self.std = scale, ratio, mean, std
        self.sampler = ResumableSampler(images, num_replicas=num_replicas, rank=rank, seed=seed)
        self.epoch = 0
        self._crops: Optional[torch.Tensor] = None
        self._flips: Optional[torch.Tensor] = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start=start)
        if self._crops is None or epoch != self.epoch:
            n, H, W = self.images.shape[:3]
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            uniforms = torch.rand(n, 23, generator=g, dtype=torch.float64)
            self._crops = sample_crops(uniforms[:, :22], H, W, self.scale, self.ratio).to(self.images.device)
            self._flips = (uniforms[:, 22] < 0.5).to(self.images.device)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._crops is None:
            self.set_epoch(self.epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.images.device)  # one copy per epoch
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield crop_resize_flip(
                self.images[index], self._crops[index], self._flips[index], self.img_size, self.mean, self.std)
