"""Map-style dataset over any reader, and the batch collation of docs/interfaces.md §1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from knet.data.categories import CategoryTable
from knet.data.config import DataSource, TransformConfig
from knet.data.readers import Reader, open_reader
from knet.data.transforms import eval_transform, train_transform


class KNetDataset(Dataset):
    """``ds[i] -> (image float (3, h, w) normalised, target dict, meta dict)``.

    Train randomness is seeded by ``(seed, epoch, i)`` (``set_epoch`` changes it per epoch), so a
    sample is the same whichever worker process loads it.
    """

    def __init__(self, reader: Reader, transforms: TransformConfig, train: bool, seed: int = 0) -> None:
        self.reader = reader
        self.transforms = transforms
        self.train = train
        self.seed = seed
        self.epoch = 0

    @property
    def categories(self) -> CategoryTable:
        return self.reader.categories

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        image, target, meta = self.reader.read(index)
        if self.train:
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
            )
            image, target, info = train_transform(image, target, self.transforms, generator)
        else:
            image, target, info = eval_transform(image, target, self.transforms)
        return image, target, {**meta, **info}


def build_dataset(src: DataSource, transforms: TransformConfig, train: bool, *, seed: int = 0) -> KNetDataset:
    """Open ``src`` (checking files and categories now) and wrap it with the transforms."""
    return KNetDataset(open_reader(src), transforms, train, seed)


@dataclass
class Batch:
    """images float (B, 3, H, W) zero-padded bottom/right to the batch max; ``image_sizes`` the
    unpadded (h, w); targets and metas one dict per image."""

    images: torch.Tensor
    targets: list[dict[str, Any]]
    image_sizes: list[tuple[int, int]]
    metas: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.targets)


def collate_batch(samples: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]]) -> Batch:
    """Pad images to the largest (h, w) in the batch (the model pads further to its divisor)."""
    if not samples:
        raise ValueError("collate_batch got an empty list of samples")
    sizes = [tuple(int(s) for s in image.shape[-2:]) for image, _, _ in samples]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.stack(
        [F.pad(image, (0, width - w, 0, height - h)) for (image, _, _), (h, w) in zip(samples, sizes)]
    )  # (B, 3, H, W)
    return Batch(images, [t for _, t, _ in samples], sizes, [m for _, _, m in samples])
