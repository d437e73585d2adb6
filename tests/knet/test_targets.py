"""prepare_targets: soft stride-4 masks from zero-padded GT, thing/stuff split, crowd exclusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from knet.targets import prepare_targets


def _target(labels: list[int], masks: torch.Tensor, iscrowd: list[bool] | None = None) -> dict:
    target = {"labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}
    if iscrowd is not None:
        target["iscrowd"] = torch.tensor(iscrowd)
    return target


def test_targets_are_soft_zero_padded_and_at_stride_4_for_odd_sizes() -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [(37, 29), (21, 40)]
    padded = (64, 64)
    targets = [
        _target([0, 1, 3], torch.rand(3, *sizes[0], generator=generator) > 0.5),
        _target([2], torch.ones(1, *sizes[1], dtype=torch.bool)),
    ]
    prepared = prepare_targets(targets, sizes, padded, num_thing_classes=3, num_stuff_classes=2)
    first, second = prepared
    assert first.thing_masks.shape == (2, 16, 16) and first.stuff_masks.shape == (1, 16, 16)
    assert first.stuff_labels.tolist() == [3] and first.thing_labels.tolist() == [0, 1]
    for masks in (first.thing_masks, first.stuff_masks, second.thing_masks):
        assert masks.min() >= 0 and masks.max() <= 1
    soft = first.thing_masks
    assert ((soft > 0) & (soft < 1)).any(), "bilinear downsampling must leave soft boundary values"
    # rows/cols fully inside the padding are zero: image 2 is 21 rows high -> stride-4 rows >= 6 are padding
    assert second.thing_masks[0, 6:].abs().sum() == 0 and second.thing_masks[0, :, 10:].abs().sum() == 0
    assert second.thing_masks[0, :5, :10].min() == 1.0
    # independent reference: pad then bilinear
    reference = F.interpolate(
        F.pad(targets[0]["masks"][:2].float(), (0, 64 - 29, 0, 64 - 37))[:, None],
        size=(16, 16),
        mode="bilinear",
    )[:, 0]
    assert torch.allclose(first.thing_masks, reference)


def test_crowd_segments_are_excluded_and_stuff_classes_get_one_mask_each() -> None:
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 4:] = True
    masks[2, :, :2] = True
    masks[3, :, 6:] = True
    target = _target([0, 1, 4, 4], masks, iscrowd=[False, True, False, False])
    (prepared,) = prepare_targets([target], [(8, 8)], (8, 8), num_thing_classes=2, num_stuff_classes=3)
    assert prepared.thing_labels.tolist() == [0]
    assert prepared.stuff_labels.tolist() == [4]
    union = prepare_targets(
        [_target([4], masks[2:3] | masks[3:4])], [(8, 8)], (8, 8), num_thing_classes=2, num_stuff_classes=3
    )[0]
    assert torch.allclose(prepared.stuff_masks, union.stuff_masks)


def test_labels_outside_the_class_range_raise_naming_the_field() -> None:
    target = _target([7], torch.ones(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be in \[0, 5\)"):
        prepare_targets([target], [(8, 8)], (8, 8), num_thing_classes=2, num_stuff_classes=3)


def test_an_image_larger_than_the_padded_size_raises() -> None:
    target = _target([0], torch.ones(1, 9, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"image_sizes\[0\] = \(9, 8\) does not fit in padded_size \(8, 8\)"):
        prepare_targets([target], [(9, 8)], (8, 8), num_thing_classes=2, num_stuff_classes=3)
