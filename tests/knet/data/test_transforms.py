"""Transforms keep image and masks aligned; collate pads to the batch max and reports sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from knet.data import TransformConfig, collate_batch
from knet.data.transforms import (
    crop,
    denormalize,
    eval_transform,
    normalize,
    resize,
    scaled_size,
    train_transform,
)

MEAN, STD = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)


def _pattern(h: int = 48, w: int = 64) -> tuple[torch.Tensor, dict]:
    """A rectangle (red channel) and a disk (green channel): image colour = mask membership."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rect = (ys >= 6) & (ys < 30) & (xs >= 4) & (xs < 28)
    disk = (ys - 30) ** 2 + (xs - 44) ** 2 <= 12**2
    image = torch.stack([rect, disk, torch.zeros_like(rect)]).to(torch.uint8) * 255  # (3, h, w)
    target = {
        "labels": torch.tensor([0, 1]),
        "masks": torch.stack([rect, disk]),
        "iscrowd": torch.tensor([False, True]),
    }
    return image, target


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood is all inside ``mask`` (brute-force interior)."""
    return -F.max_pool2d(-mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0.5


def _assert_aligned(image: torch.Tensor, target: dict) -> None:
    pixels = image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]  # undo normalise
    assert target["masks"].shape[-2:] == image.shape[-2:]
    for label, mask in zip(target["labels"].tolist(), target["masks"]):
        channel = pixels[label]
        inside, outside = _erode(mask), _erode(~mask)
        assert bool((channel[inside] > 200).all()), "mask interior must carry the segment's colour"
        assert bool((channel[outside] < 55).all()), "pixels away from the mask must not"


@pytest.mark.parametrize("seed", range(8))
def test_train_transform_keeps_masks_on_their_pixels(seed: int) -> None:
    cfg = TransformConfig(
        train_short_sides=[32, 60, 72], max_size=100, flip_prob=0.5, crop_size=(40, 40), mean=MEAN, std=STD
    )
    image, target = _pattern()
    out, out_target, info = train_transform(image, target, cfg, torch.Generator().manual_seed(seed))
    assert out.dtype == torch.float32
    assert tuple(out.shape[-2:]) == info["img_size"]
    assert max(out.shape[-2:]) <= 40
    _assert_aligned(out, out_target)
    assert out_target["iscrowd"].tolist() == [lab == 1 for lab in out_target["labels"].tolist()]


def test_flip_mirrors_image_and_masks_exactly() -> None:
    cfg = TransformConfig(train_short_sides=[48], max_size=1000, flip_prob=1.0, mean=MEAN, std=STD)
    image, target = _pattern()
    out, out_target, info = train_transform(image, target, cfg, torch.Generator().manual_seed(0))
    assert info["flipped"]
    assert torch.equal(out_target["masks"], target["masks"].flip(-1))
    expected = (image.flip(-1).float() - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(out, expected)


def test_same_generator_seed_gives_the_same_sample() -> None:
    cfg = TransformConfig(train_short_range=(30, 70), max_size=100, crop_size=(32, 32))
    image, target = _pattern()
    a = train_transform(image, target, cfg, torch.Generator().manual_seed(4))
    b = train_transform(image, target, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"]) and a[2] == b[2]


def test_crop_drops_emptied_segments_and_keeps_a_split_segment_whole() -> None:
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    u_shape = torch.zeros(20, 20, dtype=torch.bool)
    u_shape[2:18, 2:5] = u_shape[2:18, 15:18] = u_shape[15:18, 2:18] = True  # a "U": crop cuts off its base
    corner = torch.zeros(20, 20, dtype=torch.bool)
    corner[17:, 17:] = True
    target = {
        "labels": torch.tensor([3, 4]),
        "masks": torch.stack([u_shape, corner]),
        "iscrowd": torch.zeros(2, dtype=torch.bool),
    }
    _, out = crop(image, target, 0, 0, 12, 20)
    assert out["labels"].tolist() == [3]  # the corner segment is gone, the U is one segment in two parts
    assert torch.equal(out["masks"][0], u_shape[:12])
    assert out["iscrowd"].tolist() == [False]


def test_test_transform_resizes_the_image_to_the_short_side_and_keeps_the_target() -> None:
    cfg = TransformConfig(test_short_side=96, test_max_size=1000, mean=MEAN, std=STD)
    image, target = _pattern()
    out, out_target, info = eval_transform(image, target, cfg)
    assert tuple(out.shape[-2:]) == (96, 128) == info["img_size"]
    assert out_target is target  # at the original size, where evaluation scores
    _, resized_target = resize(image, target, (96, 128))
    _assert_aligned(out, resized_target)  # the image is resized exactly as the train path would


def test_long_side_cap_wins_over_the_short_side() -> None:
    assert scaled_size(100, 400, short_side=200, max_size=600) == (150, 600)
    assert scaled_size(100, 200, short_side=50, max_size=600) == (50, 100)


def test_collate_pads_bottom_right_with_zeros_and_reports_sizes() -> None:
    a = (torch.ones(3, 20, 30), {"labels": torch.tensor([0])}, {"image_id": 1})
    b = (torch.full((3, 25, 18), 2.0), {"labels": torch.tensor([1])}, {"image_id": 2})
    batch = collate_batch([a, b])
    assert batch.images.shape == (2, 3, 25, 30)
    assert batch.image_sizes == [(20, 30), (25, 18)]
    assert bool((batch.images[0, :, :20, :30] == 1).all()) and float(batch.images[0, :, 20:].abs().sum()) == 0
    assert (
        bool((batch.images[1, :, :, :18] == 2).all()) and float(batch.images[1, :, :, 18:].abs().sum()) == 0
    )
    assert [t["labels"].item() for t in batch.targets] == [0, 1]
    assert [m["image_id"] for m in batch.metas] == [1, 2]


def test_an_image_without_segments_resizes_to_empty_masks_of_the_new_size() -> None:
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 24, dtype=torch.bool)}
    image, target = resize(torch.zeros(3, 16, 24, dtype=torch.uint8), empty, (32, 48))
    assert image.shape == (3, 32, 48) and target["masks"].shape == (0, 32, 48)


def test_denormalize_inverts_normalize_exactly_and_crops_the_padding() -> None:
    cfg = TransformConfig()
    rgb = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = F.pad(normalize(rgb, cfg.mean, cfg.std), (0, 11, 0, 27))  # (3, 64, 64), as in a batch
    restored = denormalize(padded, cfg.mean, cfg.std, (37, 53))
    assert restored.dtype == np.uint8 and restored.shape == (37, 53, 3)
    assert np.array_equal(restored, rgb.permute(1, 2, 0).numpy())
