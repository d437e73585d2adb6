"""Validating dataclass configs: where a dataset lives (``DataSource``) and how it is transformed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from knet.typed_config import build, plain_fields

FORMATS = ("coco_instance", "coco_panoptic", "semantic", "parquet")
Format = Literal["coco_instance", "coco_panoptic", "semantic", "parquet"]


@dataclass
class DataSource:
    """One dataset split on disk (or behind an fsspec/pyarrow URI for ``parquet``).

    - ``coco_instance``: ``images`` folder + ``annotations`` instances JSON.
    - ``coco_panoptic``: ``images`` folder + ``annotations`` panoptic JSON + ``masks`` PNG folder.
    - ``semantic``: ``images`` folder + ``masks`` label PNG folder (+ optional ``annotations`` JSON
      with a COCO ``categories`` list naming the label values after ``reduce_zero_label``).
    - ``parquet``: ``shards`` folder/URI holding ``manifest.json`` (see ``pack_dataset``).
    """

    format: Format
    images: str | None = None
    annotations: str | None = None
    masks: str | None = None
    shards: str | None = None
    reduce_zero_label: bool = False
    ignore_index: int = 255
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"DataSource.format={self.format!r}: use one of {', '.join(FORMATS)}")
        needed = {
            "coco_instance": ("images", "annotations"),
            "coco_panoptic": ("images", "annotations", "masks"),
            "semantic": ("images", "masks"),
            "parquet": ("shards",),
        }[self.format]
        for name in needed:
            if not getattr(self, name):
                raise ValueError(f"DataSource(format={self.format!r}) needs the field {name!r} (a path)")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"DataSource.ignore_index={self.ignore_index}: label PNGs are 8-bit, use 0..255")
        if self.reduce_zero_label and self.format != "semantic":
            raise ValueError("DataSource.reduce_zero_label applies to format='semantic' only; remove it")

    def to_dict(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSource:
        """Strict (``knet.typed_config.build``): an unknown key (with a did-you-mean) or a value of the
        wrong type raises ConfigFieldError, so a YAML typo never silently becomes a default."""
        return build(cls, data, label="DataSource")


@dataclass
class TransformConfig:
    """Train/test resizing, flip, crop and normalisation (mean/std in 0-255 RGB).

    Train: short side from ``train_short_sides`` (uniform choice) or ``train_short_range``
    (uniform integer in the closed range), long side capped at ``max_size``; flip with
    ``flip_prob``; random ``crop_size`` (h, w) crop if set. Test: short side ``test_short_side``,
    long side capped at ``test_max_size``. ``size_divisor`` is for the model's own padding
    (``collate_batch`` pads only to the batch max).
    """

    train_short_sides: list[int] | None = None
    train_short_range: tuple[int, int] | None = None
    max_size: int = 1333
    flip_prob: float = 0.5
    crop_size: tuple[int, int] | None = None
    size_divisor: int = 32
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    test_short_side: int = 800
    test_max_size: int = 1333

    def __post_init__(self) -> None:
        if self.train_short_sides is None and self.train_short_range is None:
            self.train_short_sides = [800]
        if self.train_short_sides is not None and self.train_short_range is not None:
            raise ValueError("TransformConfig: set train_short_sides or train_short_range, not both")
        if self.train_short_sides is not None:
            self.train_short_sides = [int(s) for s in self.train_short_sides]
            if not self.train_short_sides or min(self.train_short_sides) < 1:
                raise ValueError(
                    "TransformConfig.train_short_sides must be a non-empty list of positive sizes"
                )
        if self.train_short_range is not None:
            lo, hi = (int(v) for v in self.train_short_range)
            if not 1 <= lo <= hi:
                raise ValueError(
                    f"TransformConfig.train_short_range={self.train_short_range}: use [low, high] "
                    "with 1 <= low <= high"
                )
            self.train_short_range = (lo, hi)
        for name in ("max_size", "size_divisor", "test_short_side", "test_max_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TransformConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"TransformConfig.flip_prob={self.flip_prob} must be in [0, 1]")
        if self.crop_size is not None:
            ch, cw = (int(v) for v in self.crop_size)
            if ch < 1 or cw < 1:
                raise ValueError(
                    f"TransformConfig.crop_size={self.crop_size}: use [height, width] >= 1 or null"
                )
            self.crop_size = (ch, cw)
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"TransformConfig.{name} needs 3 values (R, G, B), got {value}")
            setattr(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"TransformConfig.std={self.std} must be positive")

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists (tuples as lists)."""
        return plain_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformConfig:
        """Strict, as ``DataSource.from_dict``."""
        return build(cls, data, label="TransformConfig")
