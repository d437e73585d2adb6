"""Map-style dataset over any reader, and the batch collation of docs/interfaces.md §1."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from knet.data.categories import CategoryTable
from knet.data.config import DataSource, TransformConfig
from knet.data.errors import DataError
from knet.data.readers import Reader, Sample, open_reader
from knet.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

# Size of the blank image standing in for an unreadable eval item (see KNetDataset).
PLACEHOLDER_SIZE = (64, 64)


class KNetDataset(Dataset):
    """``ds[i] -> (image float (3, h, w) normalised, target dict, meta dict)``.

    Train items resize the target with the image. Eval items (``train=False``) resize only the image:
    the target stays at the original size ``meta["orig_size"]``, where evaluation scores (see
    ``knet.evaluation.process_at_original_size``).

    Train randomness is seeded by ``(seed, epoch, i)`` (``set_epoch`` changes it per epoch), so a
    sample is the same whichever worker process loads it.

    An item that fails to decode (corrupt image, PNG disagreeing with its JSON, bad segmentation,
    unknown label) raises its ``DataError`` naming the file, unless ``skip_invalid``: then it is
    skipped, with one warning per item giving the running count of this process (``self.skipped``,
    index -> error; each DataLoader worker keeps its own). In training the next readable item takes
    its place, so an epoch keeps its length. In evaluation nothing may stand in for it (that would
    count another image twice): a blank placeholder image keeps the batch shape and its target carries
    ``"skipped": <error>``, which the evaluators leave out, so metrics cover the readable images only.
    """

    def __init__(
        self,
        reader: Reader,
        transforms: TransformConfig,
        train: bool,
        seed: int = 0,
        *,
        skip_invalid: bool = False,
    ) -> None:
        self.reader = reader
        self.transforms = transforms
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.skip_invalid = skip_invalid
        self.skipped: dict[int, str] = {}

    @property
    def categories(self) -> CategoryTable:
        return self.reader.categories

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        if not self.skip_invalid:
            image, target, meta = self.reader.read(index)
        elif self.train:
            image, target, meta = self._read_or_next(index)
        else:
            image, target, meta = self._read_or_placeholder(index)
        if self.train:
            generator = torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, index))
            image, target, info = train_transform(image, target, self.transforms, generator)
        else:
            image, target, info = eval_transform(image, target, self.transforms)
        return image, target, {**meta, **info}

    def _try_read(self, index: int) -> Sample | None:
        """The item, or None after recording and warning that it cannot be read."""
        if index in self.skipped:
            return None
        try:
            return self.reader.read(index)
        except DataError as error:
            self.skipped[index] = str(error)
            log.warning(
                "skip_invalid=True: skipped unreadable item %d of %d: %s (%d item(s) skipped so far by "
                "this process)",
                index,
                len(self.reader),
                error,
                len(self.skipped),
            )
            return None

    def _read_or_next(self, index: int) -> Sample:
        for offset in range(len(self.reader)):
            sample = self._try_read((index + offset) % len(self.reader))
            if sample is not None:
                return sample
        raise DataError(
            f"skip_invalid=True, but none of the {len(self.reader)} items can be read; first problem: "
            f"{next(iter(self.skipped.values()))}"
        )

    def _read_or_placeholder(self, index: int) -> Sample:
        sample = self._try_read(index)
        if sample is not None:
            return sample
        height, width = PLACEHOLDER_SIZE
        target = {
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, height, width, dtype=torch.bool),
            "iscrowd": torch.zeros(0, dtype=torch.bool),
            "skipped": self.skipped[index],
        }
        meta = {
            "file_name": None,
            "image_id": None,
            "orig_size": (height, width),
            "skipped": self.skipped[index],
        }
        return torch.zeros(3, height, width, dtype=torch.uint8), target, meta


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s train augmentation in ``epoch`` (the same in any process)."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63


def build_dataset(
    src: DataSource,
    transforms: TransformConfig,
    train: bool,
    *,
    seed: int = 0,
    categories: CategoryTable | None = None,
) -> KNetDataset:
    """Open ``src`` (checking files and categories now) and wrap it with the transforms.

    ``categories``: the table the model is trained with (e.g. the train split's, for a val split).
    A semantic split without a categories JSON then uses it instead of the label values it happens to
    hold; any other split must list the same categories, else a ``DataError`` names its file.
    ``src.skip_invalid`` also skips items that fail to decode when read (see ``KNetDataset``).
    """
    return KNetDataset(
        open_reader(src, categories=categories), transforms, train, seed, skip_invalid=src.skip_invalid
    )


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
