"""KNet end to end through ``build_model``: loss dicts in train mode, predictions in eval mode, and
input validation."""

from __future__ import annotations

import pytest
import torch

from knet import KNetConfig, build_model
from knet.model import KNet
from knet.structures import InstancePrediction, PanopticPrediction, Prediction
from tests.support.shapes import NUM_STUFF_CLASSES, NUM_THING_CLASSES, make_batch

TINY = dict(channels=32, num_proposals=6, num_stages=2, update={"feedforward_channels": 64, "num_heads": 4})


def tiny_model(task: str = "panoptic", **overrides: object) -> KNet:
    """A tiny K-Net built by ``build_model`` (real KNetCriterion and PostProcessor)."""
    stuff = NUM_STUFF_CLASSES if task == "panoptic" else 0
    settings: dict[str, object] = {"backbone": "resnet18", **TINY, **overrides}
    cfg = KNetConfig.for_task(task, num_thing_classes=NUM_THING_CLASSES, num_stuff_classes=stuff, **settings)
    torch.manual_seed(0)
    return build_model(cfg)


def assert_panoptic_prediction(panoptic: PanopticPrediction, size: tuple[int, int]) -> None:
    """Segment ids 1..M each label some pixels (0 = VOID) and index M labels, scores and is_thing flags."""
    num_segments = panoptic.labels.shape[0]
    assert panoptic.segment_map.shape == size and panoptic.segment_map.dtype == torch.int64
    assert set(panoptic.segment_map.unique().tolist()) - {0} == set(range(1, num_segments + 1))
    assert panoptic.labels.shape == panoptic.scores.shape == panoptic.is_thing.shape == (num_segments,)
    assert panoptic.labels.dtype == torch.int64 and panoptic.scores.dtype == torch.float32
    assert panoptic.is_thing.dtype == torch.bool
    assert torch.equal(panoptic.is_thing, panoptic.labels < NUM_THING_CLASSES)


def assert_instance_prediction(instance: InstancePrediction, size: tuple[int, int], count: int) -> None:
    """The top ``count`` (kernel, thing class) pairs: no threshold and no NMS, so always ``count`` masks."""
    assert instance.masks.shape == (count, *size) and instance.masks.dtype == torch.bool
    assert instance.labels.shape == instance.scores.shape == (count,)
    assert instance.labels.dtype == torch.int64 and instance.scores.dtype == torch.float32
    assert int(instance.labels.min()) >= 0 and int(instance.labels.max()) < NUM_THING_CLASSES
    assert torch.equal(instance.scores, instance.scores.sort(descending=True).values)


@pytest.mark.parametrize("task", ["panoptic", "instance"])
@pytest.mark.parametrize(
    ("batch", "empty_index"), [(1, None), (1, 0), (2, 1)], ids=["one-image", "one-empty-image", "two-images"]
)
def test_odd_sized_batch_gives_finite_losses_and_per_image_predictions(
    task: str, batch: int, empty_index: int | None
) -> None:
    model = tiny_model(task)
    data = make_batch(0, batch, 200, 311, empty_index=empty_index, instance_only=task == "instance")
    losses = model.train()(data.images, data.targets)
    assert "s1.loss_mask" in losses and "rpn.loss_dice" in losses and "s0.loss_cls" in losses
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    sum(losses.values()).backward()
    assert model.stages[-1].fc_mask.weight.grad is not None
    with torch.no_grad():
        predictions = model.eval()(data.images)
    assert len(predictions) == batch and all(isinstance(p, Prediction) for p in predictions)
    size = (200, 311)
    coarse = (224 // 8, 320 // 8)  # stride 8 of the input padded to multiples of 32
    for prediction in predictions:
        assert prediction.image_size == size
        assert_instance_prediction(prediction.instance, size, count=TINY["num_proposals"] * NUM_THING_CLASSES)
        if task == "panoptic":
            assert_panoptic_prediction(prediction.panoptic, size)
            semantic = prediction.semantic
            assert semantic.label_map.shape == size and semantic.label_map.dtype == torch.int64
            assert int(semantic.label_map.max()) < NUM_THING_CLASSES + NUM_STUFF_CLASSES
            assert semantic.class_scores.shape == (NUM_THING_CLASSES + NUM_STUFF_CLASSES, *coarse)
            assert semantic.class_scores.dtype == torch.float32
        else:
            assert prediction.panoptic is None and prediction.semantic is None


def test_image_sizes_crop_predictions_to_each_image() -> None:
    model = tiny_model().eval()
    images = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        predictions = model(images, image_sizes=[(70, 90), (50, 61)])
    assert [p.panoptic.segment_map.shape for p in predictions] == [(70, 90), (50, 61)]


def test_output_sizes_give_every_part_at_the_original_size_and_are_checked() -> None:
    model = tiny_model().eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        predictions = model(images, image_sizes=[(64, 80), (50, 61)], output_sizes=[(128, 160), (37, 45)])
    for prediction, size in zip(predictions, [(128, 160), (37, 45)], strict=True):
        assert prediction.image_size == size
        assert_panoptic_prediction(prediction.panoptic, size)
        assert tuple(prediction.instance.masks.shape[-2:]) == size
        assert tuple(prediction.semantic.label_map.shape) == size
    with pytest.raises(ValueError, match="output_sizes has 1 entries"):
        model(images, output_sizes=[(64, 80)])
    with pytest.raises(ValueError, match="call model.eval"):
        model.train()(images, [], output_sizes=[(64, 80), (64, 80)])


def test_stages_run_on_stride_8_features_of_the_padded_input() -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        head, stages = model.predict_stages(model._pad(torch.randn(1, 3, 100, 130), 32))
    assert head.features.shape[-2:] == (128 // 8, 160 // 8)
    assert head.mask_logits.shape[1] == 6 + NUM_STUFF_CLASSES
    assert len(stages) == 2 and stages[-1].mask_logits.shape[-2:] == (16, 20)


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_panoptic_and_instance_test_images_are_padded_to_32_as_mmdets_test_pipeline(task: str) -> None:
    """The official K-Net test pipeline ends with Pad(size_divisor=32); its localization FPN needs it."""
    model = tiny_model(task).eval()
    shapes: list[tuple[int, ...]] = []
    model.backbone.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        (prediction,) = model(torch.randn(1, 3, 100, 130))
    assert model.test_size_divisor == 32 and shapes == [(1, 3, 128, 160)]
    assert prediction.image_size == (100, 130)


def test_swin_backbone_builds_and_predicts_at_odd_sizes() -> None:
    model = tiny_model(backbone={"name": "swin_tiny_patch4_window7_224"}, num_stages=1).eval()
    with torch.no_grad():
        predictions = model(torch.randn(1, 3, 70, 100))
    assert predictions[0].panoptic.segment_map.shape == (70, 100)


def test_3x3_kernels_train_end_to_end() -> None:
    model = tiny_model(update={"conv_kernel_size": 3, "feedforward_channels": 64, "num_heads": 4})
    data = make_batch(1, 1, 64, 64)
    losses = model.train()(data.images, data.targets)
    assert all(torch.isfinite(v) for v in losses.values())


def _valid() -> tuple[torch.Tensor, list[dict]]:
    data = make_batch(0, 2, 64, 64)
    return data.images, data.targets


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda images, targets: (images[:, :2], targets), r"images must be a \(B, 3, H, W\)"),
        (lambda images, targets: ((images * 255).to(torch.uint8), targets), "images must be a float"),
        (lambda images, targets: (images, targets[:1]), r"len\(targets\) = 1 must equal the batch size 2"),
        (
            lambda images, targets: (
                images,
                [{**targets[0], "masks": targets[0]["masks"].float()}, targets[1]],
            ),
            r"targets\[0\]\['masks'\] must be a bool",
        ),
        (
            lambda images, targets: (
                images,
                [targets[0], {**targets[1], "masks": targets[1]["masks"][:, :32]}],
            ),
            r"targets\[1\]\['masks'\] size \(32, 64\) must equal the image size \(64, 64\)",
        ),
        (
            lambda images, targets: (
                images,
                [{**targets[0], "labels": targets[0]["labels"] + 10}, targets[1]],
            ),
            r"targets\[0\]\['labels'\] must be in \[0, 4\)",
        ),
        (
            lambda images, targets: (
                images,
                [{**targets[0], "labels": targets[0]["labels"][:1]}, targets[1]],
            ),
            r"targets\[0\]: masks has \d+ masks but labels has 1",
        ),
        (
            lambda images, targets: (images, [targets[0], (targets[1]["labels"], targets[1]["masks"])]),
            r"targets\[1\] must be a dict with 'labels' and 'masks', got tuple",
        ),
        (
            lambda images, targets: (images, targets[0]),
            "targets must be a list with one dict per image, got dict",
        ),
    ],
    ids=[
        "channels",
        "dtype",
        "num-targets",
        "mask-dtype",
        "mask-size",
        "label-range",
        "label-count",
        "target-tuple",
        "targets-dict",
    ],
)
def test_bad_training_inputs_raise_errors_naming_the_field(corrupt, message: str) -> None:  # noqa: ANN001
    model = tiny_model().train()
    images, targets = corrupt(*_valid())
    with pytest.raises(ValueError, match=message):
        model(images, targets)


def test_missing_targets_in_train_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="targets is required in train mode"):
        tiny_model().train()(torch.randn(1, 3, 64, 64))


def test_image_sizes_larger_than_the_batch_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"image_sizes\[1\]"):
        tiny_model().eval()(torch.randn(2, 3, 64, 64), image_sizes=[(64, 64), (65, 64)])


def test_instance_labels_must_be_thing_classes() -> None:
    model = tiny_model("instance").train()
    data = make_batch(0, 1, 64, 64)  # contains stuff labels 2 and 3
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        model(data.images, data.targets)
