"""Post-processing on hand-built cases whose panoptic map / instance list / semantic map is known (§4), and
the optimised code against a plain loop that follows spec section 4 step by step on random cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from knet import postprocess
from knet.postprocess import (
    PostProcessor,
    full_resolution_pass,
    instance_topk,
    kept_kernels,
    mask_probabilities,
    panoptic_merge,
    pixel_owner,
    semantic_from_kernels,
    semantic_inference,
    stride4_probabilities,
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


# --- The optimised code against a plain loop that follows spec section 4 step by step -------------------


def _reference_probs(mask_logits, image_size, padded_size):
    """sigmoid(x2 bilinear logits) -> bilinear to the padded size -> crop (spec section 4, rescale_masks)."""
    probs = F.interpolate(mask_logits[None], scale_factor=2, mode="bilinear", align_corners=False).sigmoid()
    probs = F.interpolate(probs, size=padded_size, mode="bilinear", align_corners=False)
    return probs[0, :, : image_size[0], : image_size[1]]


def _reference_merge(scores, labels, is_thing, probs, mask_thr=0.5, score_thr=0.3, overlap_thr=0.6):
    """Spec section 4 steps 4-6 as written, with our segment ids 1, 2, ... (0 = VOID)."""
    id_map = torch.stack([scores[k] * probs[k] for k in range(len(scores))]).argmax(0)
    segment_map = torch.zeros(id_map.shape, dtype=torch.int64)
    segments = []
    for k in sorted(range(len(scores)), key=lambda k: -float(scores[k])):
        if is_thing[k] and scores[k] < score_thr:
            continue
        mask = id_map == k
        mask_area, original_area = int(mask.sum()), int((probs[k] >= mask_thr).sum())
        if mask_area > 0 and original_area > 0:
            if mask_area / original_area < overlap_thr:
                continue
            segments.append(k)
            segment_map[mask] = len(segments)
    kernels = torch.tensor(segments, dtype=torch.int64)
    return segment_map, labels[kernels], scores[kernels], is_thing[kernels], id_map


def _reference_semantic(scores, labels, probs, coarse, num_classes):
    id_map = torch.stack([scores[k] * probs[k] for k in range(len(scores))]).argmax(0)
    class_scores = torch.zeros(num_classes, *coarse.shape[1:])
    for k in range(len(scores)):
        class_scores[labels[k]] = torch.maximum(class_scores[labels[k]], scores[k] * coarse[k])
    return labels[id_map], class_scores


def _random_outputs(seed, num_proposals, things, stuff, coarse_size, *, thing_logit_shift=0.0):
    """Class logits with distinct scores; mask logits are noisy elliptic blobs, so segments form."""
    generator = torch.Generator().manual_seed(seed)
    kernels = num_proposals + stuff
    cls_logits = torch.randn(1, kernels, things + stuff, generator=generator) * 2 + thing_logit_shift
    cls_logits[0, num_proposals:, things:].diagonal().add_(3.0)  # confident stuff, so stuff segments form
    ys = torch.arange(coarse_size[0], dtype=torch.float32)[None, :, None]
    xs = torch.arange(coarse_size[1], dtype=torch.float32)[None, None, :]
    centres = (
        torch.rand(2, kernels, 1, 1, generator=generator) * torch.tensor(coarse_size)[:, None, None, None]
    )
    radii = 0.7 + torch.rand(2, kernels, 1, 1, generator=generator) * 2.5
    distance = (((ys - centres[0]) / radii[0]) ** 2 + ((xs - centres[1]) / radii[1]) ** 2).sqrt()
    mask_logits = 5.0 * (1.0 - distance)[None] + torch.randn(1, kernels, *coarse_size, generator=generator)
    return cls_logits, mask_logits


def _kernel_scores(class_probs, num_proposals, things, stuff):
    thing_scores, thing_labels = class_probs[:num_proposals, :things].max(1)
    scores = torch.cat([thing_scores, class_probs[num_proposals:, things:].diagonal()])
    labels = torch.cat([thing_labels, torch.arange(stuff) + things])
    return scores, labels, torch.arange(num_proposals + stuff) < num_proposals


def _assert_merge_matches(result, reference) -> None:
    segment_map, labels, scores, is_thing, _ = reference
    assert torch.equal(result.segment_map, segment_map)
    assert torch.equal(result.labels, labels) and torch.equal(result.scores, scores)
    assert torch.equal(result.is_thing, is_thing)


@pytest.fixture(params=[None, 3 * 4 * 48 * 64], ids=["one-chunk", "3-kernels-per-chunk"])
def chunk_bytes(request, monkeypatch):
    """Run each test with the default chunking and with chunks of 3 maps (at 48 x 64)."""
    if request.param is not None:
        monkeypatch.setattr(postprocess, "CHUNK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_merge_equals_the_spec_loop_on_random_cases(seed: int, chunk_bytes) -> None:
    proposals, things, stuff = 10, 4, 3
    cls_logits, mask_logits = _random_outputs(seed, proposals, things, stuff, (6, 8))
    scores, labels, is_thing = _kernel_scores(cls_logits[0].sigmoid(), proposals, things, stuff)
    assert scores.unique().numel() == scores.numel()  # ties-free scores
    probs = _reference_probs(mask_logits[0], (41, 57), (48, 64))
    reference = _reference_merge(scores, labels, is_thing, probs)
    thresholds = dict(mask_thr=0.5, instance_score_thr=0.3, overlap_thr=0.6)
    _assert_merge_matches(panoptic_merge(scores, labels, is_thing, probs, **thresholds), reference)
    assert torch.equal(pixel_owner(scores, probs), reference[4])
    full = full_resolution_pass(
        stride4_probabilities(mask_logits, 2)[0],
        (41, 57),
        (48, 64),
        mask_thr=0.5,
        owner_scores=scores,
        area_kernels=kept_kernels(scores, is_thing, 0.3),
    )
    fused = panoptic_merge(
        scores, labels, is_thing, None, owner=full.owner, mask_areas=full.mask_areas, **thresholds
    )
    _assert_merge_matches(fused, reference)


def test_random_cases_do_produce_thing_and_stuff_segments() -> None:
    """Guards the random-case test above against comparing nothing but VOID maps."""
    found_things = found_stuff = 0
    for seed in range(6):
        cls_logits, mask_logits = _random_outputs(seed, 10, 4, 3, (6, 8))
        scores, labels, is_thing = _kernel_scores(cls_logits[0].sigmoid(), 10, 4, 3)
        segment_is_thing = _reference_merge(
            scores, labels, is_thing, _reference_probs(mask_logits[0], (41, 57), (48, 64))
        )[3]
        found_things += int(segment_is_thing.sum())
        found_stuff += int((~segment_is_thing).sum())
    assert found_things >= 3 and found_stuff >= 3


def test_uniform_random_probabilities_match_the_spec_loop(chunk_bytes) -> None:
    generator = torch.Generator().manual_seed(7)
    probs = torch.rand(12, 48, 64, generator=generator)
    scores = torch.rand(12, generator=generator)
    labels = torch.randint(0, 5, (12,), generator=generator)
    is_thing = torch.arange(12) < 8
    reference = _reference_merge(scores, labels, is_thing, probs, overlap_thr=0.05)
    result = panoptic_merge(
        scores, labels, is_thing, probs, mask_thr=0.5, instance_score_thr=0.3, overlap_thr=0.05
    )
    _assert_merge_matches(result, reference)
    assert result.labels.numel() > 0


def test_no_kept_kernel_gives_an_empty_all_void_result(chunk_bytes) -> None:
    cls_logits, mask_logits = _random_outputs(3, 10, 4, 0, (6, 8), thing_logit_shift=-8.0)
    scores, labels, is_thing = _kernel_scores(cls_logits[0].sigmoid(), 10, 4, 0)
    assert scores.max() < 0.3  # every kernel is a low-score thing
    probs = _reference_probs(mask_logits[0], (48, 64), (48, 64))
    result = _merge(scores.tolist(), labels.tolist(), is_thing.tolist(), probs)
    _assert_merge_matches(result, _reference_merge(scores, labels, is_thing, probs))
    assert result.labels.numel() == 0 and result.segment_map.abs().sum() == 0


def test_masks_nowhere_above_mask_thr_leave_every_pixel_void(chunk_bytes) -> None:
    probs = torch.rand(5, 48, 64, generator=torch.Generator().manual_seed(2)) * 0.49  # no prob >= 0.5
    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([0, 1, 2, 3, 4])
    is_thing = torch.tensor([True, True, False, False, False])
    result = panoptic_merge(
        scores, labels, is_thing, probs, mask_thr=0.5, instance_score_thr=0.3, overlap_thr=0.6
    )
    _assert_merge_matches(result, _reference_merge(scores, labels, is_thing, probs))
    assert result.labels.numel() == 0 and result.segment_map.abs().sum() == 0


@pytest.mark.parametrize("seed", range(3))
def test_postprocessor_equals_the_spec_composition_for_every_part(seed: int, chunk_bytes) -> None:
    proposals, things, stuff = 10, 4, 3
    post = PostProcessor(
        task="panoptic", num_thing_classes=things, num_stuff_classes=stuff, num_proposals=proposals,
        max_per_image=12, panoptic_on=True, instance_on=True, semantic_on=True,
    )  # fmt: skip
    first = _random_outputs(seed, proposals, things, stuff, (6, 8))
    second = _random_outputs(seed + 10, proposals, things, stuff, (6, 8))
    cls_logits, mask_logits = torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])
    sizes = [(48, 64), (41, 57)]
    for b, prediction in enumerate(post(cls_logits, mask_logits, sizes, (48, 64))):
        probs = _reference_probs(mask_logits[b], sizes[b], (48, 64))
        class_probs = cls_logits[b].sigmoid()
        scores, labels, is_thing = _kernel_scores(class_probs, proposals, things, stuff)
        _assert_merge_matches(prediction.panoptic, _reference_merge(scores, labels, is_thing, probs))
        top_scores, flat = class_probs[:proposals, :things].flatten().topk(12)
        assert torch.equal(prediction.instance.scores, top_scores)
        assert torch.equal(prediction.instance.labels, flat % things)
        assert torch.equal(prediction.instance.masks, probs[flat // things] > 0.5)
        label_map, class_scores = _reference_semantic(
            scores, labels, probs, mask_logits[b].sigmoid(), things + stuff
        )
        assert torch.equal(prediction.semantic.label_map, label_map)
        assert torch.equal(prediction.semantic.class_scores, class_scores)


@pytest.mark.parametrize("output_size", [(80, 100), (30, 41)])
def test_output_sizes_resize_the_cropped_probabilities_bilinearly_before_every_threshold_and_merge(
    output_size: tuple[int, int], chunk_bytes
) -> None:
    """The reference's rescale=True: probabilities at the padded size, cropped, then bilinear to the
    original size, where the merge, the instance masks and the semantic map are computed."""
    proposals, things, stuff = 10, 4, 3
    post = PostProcessor(
        task="panoptic", num_thing_classes=things, num_stuff_classes=stuff, num_proposals=proposals,
        max_per_image=12, panoptic_on=True, instance_on=True, semantic_on=True,
    )  # fmt: skip
    cls_logits, mask_logits = _random_outputs(7, proposals, things, stuff, (6, 8))
    (prediction,) = post(cls_logits, mask_logits, [(41, 57)], (48, 64), output_sizes=[output_size])
    cropped = _reference_probs(mask_logits[0], (41, 57), (48, 64))
    probs = F.interpolate(cropped[None], size=output_size, mode="bilinear", align_corners=False)[0]
    class_probs = cls_logits[0].sigmoid()
    scores, labels, is_thing = _kernel_scores(class_probs, proposals, things, stuff)
    assert prediction.image_size == output_size and prediction.panoptic.segment_map.shape == output_size
    _assert_merge_matches(prediction.panoptic, _reference_merge(scores, labels, is_thing, probs))
    _, flat = class_probs[:proposals, :things].flatten().topk(12)
    assert torch.equal(prediction.instance.masks, probs[flat // things] > 0.5)
    label_map, _ = _reference_semantic(scores, labels, probs, mask_logits[0].sigmoid(), things + stuff)
    assert torch.equal(prediction.semantic.label_map, label_map)
    # not the nearest-neighbour resize of the prediction at the image size: boundaries differ
    at_image_size = post(cls_logits, mask_logits, [(41, 57)], (48, 64))[0].resized(output_size)
    assert not torch.equal(at_image_size.panoptic.segment_map, prediction.panoptic.segment_map)


def test_semantic_inference_at_output_sizes_is_argmax_of_the_cropped_logits_resized_bilinearly() -> None:
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    sizes, outputs = [(16, 16), (13, 11)], [(40, 37), (13, 11)]
    for b, prediction in enumerate(semantic_inference(logits, sizes, (16, 16), outputs)):
        upsampled = F.interpolate(logits[b : b + 1], size=(16, 16), mode="bilinear")
        cropped = upsampled[:, :, : sizes[b][0], : sizes[b][1]]
        expected = F.interpolate(cropped, size=outputs[b], mode="bilinear")[0].argmax(0)
        assert torch.equal(prediction.label_map, expected)


def test_instance_only_postprocessor_resizes_only_the_top_kernels_and_matches_the_spec(chunk_bytes) -> None:
    post = PostProcessor(
        task="instance", num_thing_classes=4, num_stuff_classes=0, num_proposals=10, max_per_image=6,
        panoptic_on=False, instance_on=True, semantic_on=False,
    )  # fmt: skip
    cls_logits, mask_logits = _random_outputs(5, 10, 4, 0, (6, 8))
    prediction = post(cls_logits, mask_logits, [(45, 60)], (48, 64))[0]
    probs = _reference_probs(mask_logits[0], (45, 60), (48, 64))
    scores, flat = cls_logits[0].sigmoid().flatten().topk(6)
    assert (flat // 4).unique().numel() < 10  # some kernels are never resized
    assert torch.equal(prediction.instance.masks, probs[flat // 4] > 0.5)
    assert torch.equal(prediction.instance.labels, flat % 4) and torch.equal(
        prediction.instance.scores, scores
    )
    assert prediction.panoptic is None and prediction.semantic is None
    assert torch.equal(instance_topk(cls_logits[0].sigmoid(), probs, max_per_image=6, mask_thr=0.5).masks,
                       prediction.instance.masks)  # fmt: skip


def test_semantic_from_kernels_equals_the_per_kernel_loop() -> None:
    cls_logits, mask_logits = _random_outputs(4, 10, 4, 3, (6, 8))
    scores, labels, _ = _kernel_scores(cls_logits[0].sigmoid(), 10, 4, 3)
    probs, coarse = _reference_probs(mask_logits[0], (48, 64), (48, 64)), mask_logits[0].sigmoid()
    result = semantic_from_kernels(scores, labels, probs, coarse, num_classes=7)
    label_map, class_scores = _reference_semantic(scores, labels, probs, coarse, 7)
    assert torch.equal(result.label_map, label_map) and torch.equal(result.class_scores, class_scores)
