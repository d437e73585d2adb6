"""Post-processing on hand-built cases whose panoptic map / instance list / semantic map is known (§4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from knet.postprocess import (
    PostProcessor,
    instance_topk,
    mask_probabilities,
    panoptic_merge,
    semantic_from_kernels,
    semantic_inference,
)


def _merge(scores, labels, is_thing, probs):
    return panoptic_merge(
        torch.tensor(scores),
        torch.tensor(labels),
        torch.tensor(is_thing),
        probs,
        mask_thr=0.5,
        instance_score_thr=0.3,
        overlap_thr=0.6,
    )


def test_low_score_things_are_dropped_after_the_argmax_leaving_void_and_stuff_is_always_a_candidate() -> None:
    probs = torch.zeros(2, 4, 4)
    probs[0, :, :2] = 1.0  # thing, score 0.2 < 0.3: wins the left half, then is dropped
    probs[1] = 0.1
    probs[1, :, 2:] = 0.9  # stuff with score 0.15: no stuff threshold
    result = _merge([0.2, 0.15], [1, 4], [True, False], probs)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[:, 2:] = 1
    assert torch.equal(result.segment_map, expected)
    assert result.labels.tolist() == [4] and result.is_thing.tolist() == [False]
    assert result.scores.tolist() == pytest.approx([0.15])


def test_segments_covering_less_than_overlap_thr_of_their_mask_are_dropped() -> None:
    probs = torch.zeros(3, 4, 4)
    probs[0, :, :2] = 1.0  # score 0.9: owns cols 0-1
    probs[1, :, :3] = 1.0  # score 0.8: owns only col 2 = 4/12 of its mask < 0.6 -> dropped, col 2 VOID
    probs[2, :, 3] = 1.0  # score 0.7: owns col 3 = all of its mask
    result = _merge([0.9, 0.8, 0.7], [0, 1, 2], [True, True, True], probs)
    expected = torch.tensor([[1, 1, 0, 2]] * 4)
    assert torch.equal(result.segment_map, expected)
    assert result.labels.tolist() == [0, 2]
    assert result.scores.tolist() == pytest.approx([0.9, 0.7])


def test_segment_ids_run_from_1_in_descending_score_order() -> None:
    probs = torch.zeros(3, 2, 6)
    probs[0, :, 0:2] = 0.8
    probs[1, :, 2:4] = 0.8
    probs[2, :, 4:6] = 0.8
    result = _merge([0.4, 0.95, 0.6], [0, 1, 3], [True, True, False], probs)
    assert torch.equal(result.segment_map, torch.tensor([[3, 3, 1, 1, 2, 2]] * 2))
    assert result.labels.tolist() == [1, 3, 0]
    assert result.is_thing.tolist() == [True, False, True]
    assert result.segment_map.min() >= 1 and result.segment_map.max() == result.labels.numel()


def test_instance_topk_lets_one_kernel_give_two_labels() -> None:
    class_probs = torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.2, 0.05]])
    mask_probs = torch.zeros(2, 3, 3)
    mask_probs[0, 0] = 0.7
    mask_probs[1, 2] = 0.6
    result = instance_topk(class_probs, mask_probs, max_per_image=3, mask_thr=0.5)
    assert result.scores.tolist() == pytest.approx([0.9, 0.85, 0.8])
    assert result.labels.tolist() == [0, 0, 1]
    assert torch.equal(result.masks, mask_probs[[0, 1, 0]] > 0.5)
    assert result.masks.dtype == torch.bool


def test_semantic_map_of_a_panoptic_model_labels_each_pixel_by_its_best_kernel_vote() -> None:
    probs = torch.zeros(3, 2, 4)
    probs[0, :, :2] = 1.0
    probs[1] = 0.5
    probs[2, :, 3] = 1.0
    scores, labels = torch.tensor([0.2, 0.6, 0.4]), torch.tensor([0, 3, 0])
    result = semantic_from_kernels(scores, labels, probs, probs, num_classes=4)
    # votes: kernel 0 -> 0.2 (cols 0-1), kernel 1 -> 0.3 everywhere, kernel 2 -> 0.4 (col 3)
    assert torch.equal(result.label_map, torch.tensor([[3, 3, 3, 0]] * 2))
    assert result.class_scores.shape == (4, 2, 4)
    assert torch.allclose(result.class_scores[0, 0], torch.tensor([0.2, 0.2, 0.0, 0.4]))
    assert result.class_scores[1].abs().sum() == 0 and result.class_scores[2].abs().sum() == 0


def test_postprocessor_upsamples_crops_and_returns_every_part_at_the_image_size() -> None:
    generator = torch.Generator().manual_seed(0)
    things, stuff, proposals = 2, 2, 3
    post = PostProcessor(
        task="panoptic",
        num_thing_classes=things,
        num_stuff_classes=stuff,
        num_proposals=proposals,
        max_per_image=4,
        panoptic_on=True,
        instance_on=True,
        semantic_on=True,
    )
    cls_logits = torch.randn(2, proposals + stuff, things + stuff, generator=generator)
    mask_logits = torch.randn(2, proposals + stuff, 4, 4, generator=generator) * 3
    sizes = [(32, 32), (27, 21)]
    predictions = post(cls_logits, mask_logits, sizes, (32, 32))
    for b, (prediction, size) in enumerate(zip(predictions, sizes)):
        assert prediction.image_size == size
        reference = F.interpolate(mask_logits[b : b + 1], scale_factor=2, mode="bilinear").sigmoid()
        reference = F.interpolate(reference, size=(32, 32), mode="bilinear")[0, :, : size[0], : size[1]]
        assert torch.allclose(mask_probabilities(mask_logits[b], size, (32, 32), 2), reference)
        probs = cls_logits[b].sigmoid()
        scores = torch.cat([probs[:proposals, :things].max(1).values, probs[proposals:, things:].diagonal()])
        labels = torch.cat([probs[:proposals, :things].argmax(1), torch.arange(stuff) + things])
        is_thing = torch.arange(proposals + stuff) < proposals
        expected = panoptic_merge(
            scores, labels, is_thing, reference, mask_thr=0.5, instance_score_thr=0.3, overlap_thr=0.6
        )
        assert torch.equal(prediction.panoptic.segment_map, expected.segment_map)
        assert prediction.instance.masks.shape == (4, *size)
        assert (
            prediction.instance.scores.tolist()
            == sorted(probs[:proposals, :things].flatten().tolist())[::-1][:4]
        )
        assert prediction.semantic.label_map.shape == size
        assert prediction.semantic.class_scores.shape == (things + stuff, 4, 4)


def test_semantic_inference_is_argmax_of_bilinear_logits_cropped_to_the_image() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=generator)
    sizes = [(16, 16), (13, 11)]
    predictions = semantic_inference(logits, sizes, (16, 16))
    for b, (prediction, size) in enumerate(zip(predictions, sizes)):
        upsampled = F.interpolate(logits[b : b + 1], size=(16, 16), mode="bilinear")[0]
        assert torch.equal(prediction.label_map, upsampled[:, : size[0], : size[1]].argmax(0))
        assert prediction.class_scores.shape == (3, 4, 4)
        assert torch.allclose(prediction.class_scores.sum(0), torch.ones(4, 4))


def test_postprocessor_rejects_an_instance_model_with_stuff_parts() -> None:
    with pytest.raises(ValueError, match="panoptic_on=False"):
        PostProcessor(
            task="instance", num_thing_classes=2, num_stuff_classes=0, num_proposals=3,
            panoptic_on=True, instance_on=True, semantic_on=False,
        )  # fmt: skip
