""" The in-memory pretraining data path: torchvision's crops and pixels, every image once per epoch, exact resume,
the same pixels on any number of ranks, and clear errors for data it cannot hold. """
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from timm_arm.pretrain.data import DataError, open_dataset
from timm_arm.pretrain.in_memory import InMemoryError, InMemoryLoader, crop_resize_flip, decode_images, sample_crops

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def _reference_params(u, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, line by line, drawing its uniforms from `u` instead."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * (scale[0] + u[2 * attempt] * (scale[1] - scale[0]))
        aspect_ratio = math.exp(log_ratio[0] + u[2 * attempt + 1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _reference_pixels(image, crop, flip, size):
    """torchvision's resized_crop (bicubic, antialiased) + hflip on one HWC uint8 image, then normalise."""
    top, left, h, w = crop
    x = TF.resized_crop(image.permute(2, 0, 1).double(), top, left, h, w, [size, size],
                        interpolation=InterpolationMode.BICUBIC, antialias=True)
    if flip:
        x = TF.horizontal_flip(x)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64).view(3, 1, 1) * 255
    return (x.clamp(0, 255) - mean) / std


@pytest.mark.parametrize('height, width, scale, ratio', [
    (32, 32, (0.2, 1.0), (3 / 4, 4 / 3)),
    (40, 28, (0.08, 1.0), (3 / 4, 4 / 3)),
    (4, 64, (0.9, 1.0), (3 / 4, 4 / 3)),   # no attempt fits: the central-crop fallback, ratio clamped
    (64, 4, (0.9, 1.0), (3 / 4, 4 / 3)),
    (20, 20, (0.5, 0.5), (1.0, 1.0)),
])
def test_crops_follow_torchvision(height, width, scale, ratio):
    u = torch.rand(300, 22, dtype=torch.float64)
    crops = sample_crops(u, height, width, scale, ratio)
    expected = torch.tensor([_reference_params(row.tolist(), height, width, scale, ratio) for row in u])
    assert torch.equal(crops, expected)
    top, left, h, w = crops.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('height, width, size', [(32, 32, 32), (40, 28, 32), (64, 48, 24), (17, 96, 64)])
def test_pixels_equal_torchvision_resized_crop(device, height, width, size):
    images = torch.randint(0, 256, (12, height, width, 3), dtype=torch.uint8)
    u = torch.rand(12, 23, dtype=torch.float64)
    crops, flips = sample_crops(u[:, :22], height, width, (0.08, 1.0), (3 / 4, 4 / 3)), u[:, 22] < 0.5
    out = crop_resize_flip(images.to(device), crops, flips, size)
    assert out.shape == (12, 3, size, size) and out.dtype == torch.float32 and out.device.type == device
    for i in range(12):
        ref = _reference_pixels(images[i], crops[i].tolist(), bool(flips[i]), size)
        assert (out[i].cpu().double() - ref).abs().max() < 1e-4, i


def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch, start=start)
    return [batch.clone() for batch in loader]


def _images(n=24, h=12, w=10):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8)


def test_every_image_once_per_epoch():
    images = _images()
    seen = []
    for rank in range(2):
        loader = InMemoryLoader(images, batch_size=4, img_size=8, num_replicas=2, rank=rank, seed=3)
        loader.set_epoch(5)
        assert len(loader) == 3
        seen += loader.sampler.__iter__()
    assert sorted(seen) == list(range(24))
    # another epoch: another order and other crops
    a, b = InMemoryLoader(images, 4, 8, seed=3), InMemoryLoader(images, 4, 8, seed=3)
    assert not torch.equal(torch.cat(_epoch(a, 0)), torch.cat(_epoch(b, 1)))


def test_resume_mid_epoch_gives_the_same_batches():
    images = _images()
    full = _epoch(InMemoryLoader(images, 4, 8, seed=1), 2)
    resumed = _epoch(InMemoryLoader(images, 4, 8, seed=1), 2, start=3 * 4)  # after 3 batches
    assert len(full) == 6 and len(resumed) == 3
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a, b)
    again = _epoch(InMemoryLoader(images, 4, 8, seed=1), 2)
    assert all(torch.equal(a, b) for a, b in zip(full, again))


def test_two_ranks_see_the_pixels_of_one():
    """Crops belong to images, not to ranks: at the same global batch, step i of 2 ranks = step i of 1 rank."""
    images = _images()
    one = _epoch(InMemoryLoader(images, 8, 8, seed=7), 4)
    ranks = [_epoch(InMemoryLoader(images, 4, 8, num_replicas=2, rank=r, seed=7), 4) for r in range(2)]
    for step, batch in enumerate(one):
        # DistributedSampler deals the shuffled indices out round-robin: rank r takes positions r, r + 2, ...
        assert torch.equal(batch[0::2], ranks[0][step]) and torch.equal(batch[1::2], ranks[1][step])


def _folder(root, sizes):
    for i, (w, h) in enumerate(sizes):
        os.makedirs(root / 'a', exist_ok=True)
        Image.fromarray(np.full((h, w, 3), i, dtype=np.uint8)).save(root / 'a' / f'{i:03d}.png')
    return str(root)


def test_decode_keeps_every_pixel(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 9, 3), dtype=np.uint8) for _ in range(5)]
    os.makedirs(tmp_path / 'x')
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / 'x' / f'{i}.png')
    images = decode_images(open_dataset('', str(tmp_path)), max_bytes=10 ** 6, workers=0)
    assert images.shape == (5, 6, 9, 3) and images.dtype == torch.uint8
    assert all(np.array_equal(images[i].numpy(), arrays[i]) for i in range(5))


def test_decode_errors_name_the_problem(tmp_path):
    mixed = open_dataset('', _folder(tmp_path / 'mixed', [(8, 8)] * 3 + [(8, 9)] + [(8, 8)] * 2))
    with pytest.raises(InMemoryError, match=r'one size: .*003\.png is 8x9 px, the first image 8x8 px'):
        decode_images(mixed, max_bytes=10 ** 6, workers=0)
    same = open_dataset('', _folder(tmp_path / 'same', [(16, 16)] * 10))
    with pytest.raises(InMemoryError, match=r'10 images of 16x16 px need 0\.00 GiB .* budget of 0\.00 GiB'):
        decode_images(same, max_bytes=10 * 16 * 16 * 3 - 1, workers=0)
    os.makedirs(tmp_path / 'empty' / 'a')
    with pytest.raises(DataError, match='holds no images'):
        open_dataset('', str(tmp_path / 'empty'))
