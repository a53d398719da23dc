""" Data for AR pretraining: timm datasets, per-sample seeded augmentation and a resumable distributed sampler.

Augmentation draws its randomness from a generator seeded by (seed, epoch, sample index), so a sample's crop
and flip do not depend on worker count, world size or where a run was interrupted: a resumed run, and a run on
a different number of GPUs at the same global batch, see exactly the same pixels.
"""
import logging
import os
import signal
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset

__all__ = ['pretrain_transform', 'SeededTransformDataset', 'ResumableSampler', 'WorkerLoader', 'open_dataset',
           'DataError']

_logger = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.gif', '.ppm')


class DataError(ValueError):
    """The data folder / dataset cannot be used; raised before any GPU work."""


def pretrain_transform(img_size: int, scale=(0.2, 1.0), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """RandomResizedCrop(scale 0.2-1 in the paper, bicubic) + horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class SeededTransformDataset(Dataset):
    """Wraps a timm dataset: image -> transform with the torch RNG seeded by (seed, epoch, index).

    The caller's RNG state is left untouched (fork_rng), so this is safe with num_workers=0 too.
    """

    def __init__(self, dataset: Dataset, transform, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        img, _ = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 100_000_007 + index) % (2 ** 63))
            return self.transform(img)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled with (seed, epoch), drop_last) that can start an epoch after `start` samples.

    Works without torch.distributed when num_replicas / rank are given. Resuming mid-epoch skips the samples
    this rank already consumed, reproducing the uninterrupted order.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _check_folder(root: str) -> None:
    if not root:
        raise DataError('No --data-dir given.')
    if not os.path.exists(root):
        raise DataError(f'Data path {root!r} does not exist.')
    if os.path.isfile(root) and root.endswith(('.tar.gz', '.tgz')):
        raise DataError(f'{root!r} is a compressed tar: random access into it is impractically slow. '
                        f'Extract it (tar -xzf {root} -C DIR) and pass the folder, or repack it as a plain .tar.')
    if os.path.isdir(root):
        for _, _, files in os.walk(root):
            if any(f.lower().endswith(_IMAGE_EXTENSIONS) for f in files):
                return
        raise DataError(f'Data folder {root!r} holds no images ({", ".join(_IMAGE_EXTENSIONS)}).')


def open_dataset(name: str, root: str, split: str = 'train', check_images: int = 8, **kwargs) -> Dataset:
    """timm's create_dataset (image folder, .tar, or any timm dataset name) returning PIL images, no transform.

    Fails early with DataError on a missing / empty source or when one of the first `check_images` images
    cannot be decoded. kwargs go to create_dataset (e.g. download=True for torch/... datasets).
    """
    if not name:  # plain folder / tar: check it ourselves for a clear message
        _check_folder(root)
        if os.path.isdir(root) and os.path.isdir(os.path.join(root, split)):
            root = os.path.join(root, split)
    try:
        dataset = create_dataset(name, root=root, split=split, is_training=True, **kwargs)
    except Exception as e:  # timm raises assorted errors for missing / malformed sources
        raise DataError(f'Cannot open dataset {name or "(image folder)"} at {root!r}: {e}') from e
    if len(dataset) == 0:
        raise DataError(f'Dataset {name or "(image folder)"} at {root!r} is empty.')
    reader = getattr(dataset, 'reader', None)
    for i in range(min(check_images, len(dataset))):
        try:
            sample, _ = reader[i] if reader is not None else dataset[i]
            if not hasattr(sample, 'convert'):  # a file object from the reader
                with sample:
                    Image.open(sample).convert('RGB')
            else:
                sample.convert('RGB')
        except Exception as e:
            filename = reader.filename(i) if reader is not None and hasattr(reader, 'filename') else f'#{i}'
            raise DataError(f'Cannot decode image {filename} in {root!r}: {e}') from e
    return dataset


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Workers ignore SIGINT / SIGTERM: a scheduler (or Ctrl-C) signals the whole process group, and the training
    process, which checkpoints at the next step boundary, still needs its workers until then; it stops them itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class WorkerLoader:
    """Worker processes decode and augment each sample (pretrain_transform, seeded per sample).

    set_epoch(epoch, start) selects the epoch and skips the first `start` samples of this rank; iterating yields
    (micro_batch, C, H, W) float32 CPU batches (pinned if asked).
    """

    def __init__(
            self,
            dataset: Dataset,
            batch_size: int,
            img_size: int,
            num_replicas: int = 1,
            rank: int = 0,
            seed: int = 0,
            scale=(0.2, 1.0),
            workers: int = 8,
            pin_memory: bool = False,
    ):
        self.dataset = SeededTransformDataset(dataset, pretrain_transform(img_size, scale=tuple(scale)), seed=seed)
        self.sampler = ResumableSampler(self.dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        # workers restart each epoch (not persistent): they copy the dataset, whose epoch (the augmentation seed)
        # changes
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=pin_memory, drop_last=True,
                                 worker_init_fn=_leave_stop_signals_to_the_trainer)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=start)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)
