"""knet.visualize.render_overlay: fixed class colours, labels inside their segments, a legend beside."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knet.structures import InstancePrediction, PanopticPrediction, Prediction, SemanticPrediction
from knet.visualize import (
    class_colour,
    instance_colour,
    label_anchor,
    legend_entries,
    render_overlay,
)

NAMES = ["car", "person", "sky", "road"]
H, W = 96, 128
ALPHA = 0.5


def grey_image() -> np.ndarray:
    return np.full((H, W, 3), 100, dtype=np.uint8)


def blended(image_value: int, colour: tuple[int, int, int], alpha: float = ALPHA) -> np.ndarray:
    return np.rint((1 - alpha) * image_value + alpha * np.array(colour, dtype=np.float64)).astype(np.uint8)


def panoptic(segment_map: np.ndarray, labels: list[int], things: list[bool]) -> Prediction:
    return Prediction(
        segment_map.shape,
        panoptic=PanopticPrediction(
            torch.from_numpy(segment_map).long(),
            torch.tensor(labels),
            torch.ones(len(labels)),
            torch.tensor(things),
        ),
    )


def halves() -> Prediction:
    """Left half: a car (segment 1); right half: sky (segment 2)."""
    segment_map = np.ones((H, W), dtype=np.int64)
    segment_map[:, W // 2 :] = 2
    return panoptic(segment_map, [0, 2], [True, False])


def ring(size: int = 64, outer: int = 28, inner: int = 16) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    radius = np.hypot(rows - size / 2, cols - size / 2)
    return (radius < outer) & (radius >= inner)


def test_the_output_is_the_image_with_a_legend_strip_to_its_right() -> None:
    out = render_overlay(grey_image(), halves(), NAMES)
    assert out.dtype == np.uint8 and out.shape[0] == H and out.shape[1] > W and out.shape[2] == 3


def test_nothing_drawn_gives_the_image_unchanged_and_no_legend() -> None:
    nothing = panoptic(np.zeros((H, W), dtype=np.int64), [], [])
    assert np.array_equal(render_overlay(grey_image(), nothing, NAMES), grey_image())


def test_segment_pixels_get_their_class_colour_blended_at_alpha() -> None:
    out = render_overlay(grey_image(), halves(), NAMES, alpha=ALPHA)
    # Corners are far from the labels, which sit at each half's centre.
    assert np.array_equal(out[2, 2], blended(100, class_colour(0)))
    assert np.array_equal(out[H - 3, W - 3], blended(100, class_colour(2)))
    faint = render_overlay(grey_image(), halves(), NAMES, alpha=0.2)
    assert np.array_equal(faint[2, 2], blended(100, class_colour(0), alpha=0.2))


def test_a_class_has_the_same_colour_in_every_call_for_panoptic_and_semantic() -> None:
    first = render_overlay(grey_image(), halves(), NAMES)
    segment_map = np.full((H, W), 2, dtype=np.int64)
    segment_map[: H // 2] = 1
    other = panoptic(segment_map, [3, 0], [False, True])  # the car is now segment 2, beside a road
    second = render_overlay(grey_image(), other, NAMES)
    assert np.array_equal(first[2, 2], second[H - 3, 2])  # both: car
    label_map = np.zeros((H, W), dtype=np.int64)
    label_map[:, W // 2 :] = 3
    semantic = render_overlay(
        grey_image(), Prediction((H, W), semantic=SemanticPrediction(torch.from_numpy(label_map))), NAMES
    )
    assert np.array_equal(semantic[2, 2], first[2, 2])  # car, semantic part
    assert np.array_equal(semantic[2, W - 3], second[2, 2])  # road in both


def test_colours_are_distinct_per_class_and_instances_of_a_class_are_shades_of_it() -> None:
    colours = [class_colour(c) for c in range(80)]
    assert len(set(colours)) == 80
    assert instance_colour(5, 0) == class_colour(5)
    shades = [instance_colour(5, k) for k in range(4)]
    assert len(set(shades)) == 4 and shades == [instance_colour(5, k) for k in range(4)]


def test_instances_below_the_score_threshold_are_not_drawn() -> None:
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, :, : W // 2] = True
    masks[1, :, W // 2 :] = True
    prediction = Prediction(
        (H, W), instance=InstancePrediction(masks, torch.tensor([0, 1]), torch.tensor([0.9, 0.1]))
    )
    out = render_overlay(grey_image(), prediction, NAMES, score_threshold=0.3)
    assert np.array_equal(out[:H, W // 2 : W], grey_image()[:, W // 2 :])  # the person at 0.1: untouched
    assert np.array_equal(out[2, 2], blended(100, class_colour(0)))
    assert [name for name, _ in legend_entries(prediction, NAMES)] == ["car"]
    everything = render_overlay(grey_image(), prediction, NAMES, score_threshold=0.05)
    assert np.array_equal(everything[2, W - 3], blended(100, class_colour(1)))


def test_the_label_of_a_ring_lies_inside_the_ring_where_its_centroid_does_not() -> None:
    mask = ring()
    rows, cols = np.nonzero(mask)
    centroid = (round(rows.mean()), round(cols.mean()))
    assert not mask[centroid]
    row, col = label_anchor(mask)
    assert mask[row, col]
    assert label_anchor(mask, min_depth=20) is None  # the ring is 6 pixels deep: too thin for that


def test_the_ring_label_is_drawn_on_the_ring_not_in_its_hole() -> None:
    mask = ring(size=96, outer=36, inner=16)  # 20 pixels thick: the label fits above the hole
    segment_map = np.zeros((96, 96), dtype=np.int64)
    segment_map[mask] = 1
    image = np.full((96, 96, 3), 100, dtype=np.uint8)
    out = render_overlay(image, panoptic(segment_map, [2], [False]), NAMES)[:, :96]
    hole = ~mask & (np.hypot(*(np.mgrid[:96, :96] - 48)) < 16)
    assert np.all(out[hole] == 100)  # nothing written in the hole
    text = np.all(out == 255, axis=-1) | np.all(out == 0, axis=-1)  # white letters, black outline
    assert text[mask].any()


def test_the_legend_lists_exactly_the_classes_drawn_with_their_colours() -> None:
    segment_map = np.zeros((H, W), dtype=np.int64)
    segment_map[:40, :60], segment_map[50:, :60], segment_map[:, 70:] = 1, 2, 3
    prediction = panoptic(segment_map, [1, 1, 3], [True, True, False])
    entries = legend_entries(prediction, NAMES)
    assert entries == [("person", class_colour(1)), ("road", class_colour(3))]
    strip = render_overlay(grey_image(), prediction, NAMES)[:, W:]
    for _, colour in entries:
        assert np.all(strip == colour, axis=-1).sum() >= 25  # its swatch
    for absent in (0, 2):
        assert not np.all(strip == class_colour(absent), axis=-1).any()


def test_the_part_defaults_to_panoptic_and_a_missing_part_is_refused() -> None:
    label_map = torch.full((H, W), 3, dtype=torch.int64)
    both = halves()
    both.semantic = SemanticPrediction(label_map)
    assert [n for n, _ in legend_entries(both, NAMES)] == ["car", "sky"]
    assert [n for n, _ in legend_entries(both, NAMES, part="semantic")] == ["road"]
    with pytest.raises(ValueError, match="no instance part"):
        render_overlay(grey_image(), both, NAMES, part="instance")


def test_a_prediction_of_another_size_is_refused() -> None:
    with pytest.raises(ValueError, match="resized"):
        render_overlay(np.zeros((H + 1, W, 3), dtype=np.uint8), halves(), NAMES)


def test_a_label_at_the_images_edge_is_shifted_inside_not_cut_off() -> None:
    """A segment along the right border: its name is drawn whole (as many white text pixels as the same
    name drawn in the middle of the image), inside the image, not clipped at its edge."""

    def white_text_pixels(columns: slice) -> int:
        segment_map = np.zeros((128, 128), dtype=np.int64)
        segment_map[40:80, columns] = 1
        image = np.full((128, 128, 3), 100, dtype=np.uint8)
        drawn = render_overlay(image, panoptic(segment_map, [0], [True]), ["a long name"])
        return int((drawn[:, :128] == 255).all(-1).sum())

    assert white_text_pixels(slice(96, 128)) == white_text_pixels(slice(32, 96)) > 0
