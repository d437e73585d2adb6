"""The semantic variant (spec section 3): a decode head's class kernels refined by the update stages,
softmax grouping, a CE loss on every logit map, argmax inference; and it learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from knet import KNetConfig, build_model
from knet.decode_heads import ASPPHead, FCNHead, PSPHead, UPerHead
from knet.model import KNet
from knet.semantic_loss import cross_entropy, label_maps
from knet.structures import SemanticPrediction
from knet.update_stage import KernelUpdateHead
from tests.support.shapes import NUM_STUFF_CLASSES, NUM_THING_CLASSES, make_batch

NUM_CLASSES = NUM_THING_CLASSES + NUM_STUFF_CLASSES
TINY = dict(channels=64, num_stages=2, update={"feedforward_channels": 128, "num_heads": 4})


def semantic_targets(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shapes generator's segments merged per class: one mask per present class."""
    labels = target["labels"].unique()
    masks = [target["masks"][target["labels"] == label].any(0) for label in labels]
    size = target["masks"].shape[-2:]
    return {
        "labels": labels,
        "masks": torch.stack(masks) if masks else torch.zeros(0, *size, dtype=torch.bool),
    }


def semantic_model(decode_head: str = "uper", **overrides: object) -> KNet:
    settings: dict[str, object] = {"backbone": "resnet18", "decode_head": decode_head, **TINY, **overrides}
    cfg = KNetConfig.for_task(
        "semantic", num_thing_classes=NUM_THING_CLASSES, num_stuff_classes=NUM_STUFF_CLASSES, **settings
    )
    torch.manual_seed(0)
    return build_model(cfg)


def assert_semantic_prediction(
    semantic: SemanticPrediction, size: tuple[int, int], padded: tuple[int, int], stride: int
) -> None:
    """label_map: a class per pixel at the image size; class_logits: the raw per-class logits at the
    last stage's resolution of the network's (padded or unpadded) input; class_scores: their softmax;
    label_map: the argmax of the logits upsampled (bilinear) to that input, cropped to the image."""
    coarse = (-(-padded[0] // stride), -(-padded[1] // stride))  # every stride-2 conv rounds up
    assert tuple(semantic.label_map.shape) == size and semantic.label_map.dtype == torch.int64
    assert int(semantic.label_map.min()) >= 0 and int(semantic.label_map.max()) < NUM_CLASSES
    assert semantic.class_scores.shape == semantic.class_logits.shape == (NUM_CLASSES, *coarse)
    assert semantic.class_scores.dtype == semantic.class_logits.dtype == torch.float32
    torch.testing.assert_close(semantic.class_scores.sum(0), torch.ones(coarse))
    torch.testing.assert_close(
        semantic.class_scores, torch.softmax(semantic.class_logits.double(), 0).float()
    )
    upsampled = torch.nn.functional.interpolate(semantic.class_logits[None], size=padded, mode="bilinear")
    assert torch.equal(upsampled[0, :, : size[0], : size[1]].argmax(0), semantic.label_map)


@pytest.mark.parametrize("decode_head", ["fcn", "psp", "aspp", "uper"])
def test_each_decode_head_gives_a_loss_per_logit_map_and_a_label_map_at_each_image_size(
    decode_head: str,
) -> None:
    model = semantic_model(decode_head)
    data = make_batch(0, 2, 100, 131, empty_index=1)
    targets = [semantic_targets(t) for t in data.targets]
    losses = model.train()(data.images, targets)
    assert set(losses) == {"decode.loss_seg", "s0.loss_seg", "s1.loss_seg", "aux.loss_seg"}
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value) and value > 0, key
    sum(losses.values()).backward()
    assert model.kernel_head.conv_seg.weight.grad.abs().sum() > 0  # the kernels are its weights
    assert model.stages[-1].fc_mask.weight.grad is not None

    sizes = [(100, 131), (90, 120)]
    with torch.no_grad():
        predictions = model.eval()(data.images, image_sizes=sizes)
    stride = 4 if decode_head == "uper" else 8  # UPerNet fuses at stride 4; the dilated heads run at 8
    assert len(predictions) == 2
    for prediction, size in zip(predictions, sizes, strict=True):
        assert prediction.panoptic is None and prediction.instance is None
        assert_semantic_prediction(prediction.semantic, size, size, stride)  # each unpadded, as mmseg


def test_a_one_image_batch_gives_finite_losses_and_one_prediction_at_its_odd_size() -> None:
    model = semantic_model("fcn")
    data = make_batch(2, 1, 100, 131)
    targets = [semantic_targets(t) for t in data.targets]
    assert targets[0]["labels"].numel() > 0
    losses = model.train()(data.images, targets)
    assert all(value.dim() == 0 and torch.isfinite(value) and value > 0 for value in losses.values())
    with torch.no_grad():
        predictions = model.eval()(data.images)
    assert len(predictions) == 1 and predictions[0].image_size == (100, 131)
    assert_semantic_prediction(predictions[0].semantic, (100, 131), (100, 131), 8)
    with torch.no_grad():
        (original,) = model(data.images, output_sizes=[(200, 262)])  # the size before a test-time resize
    assert original.image_size == (200, 262) and original.semantic.label_map.shape == (200, 262)


def _backbone_inputs(model: KNet) -> list[tuple[int, ...]]:
    """Records the shape of every tensor the backbone receives."""
    shapes: list[tuple[int, ...]] = []
    model.backbone.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_semantic_test_images_run_unpadded_as_mmseg_and_training_still_pads_to_32() -> None:
    """mmseg's K-Net test pipeline (Resize keep_ratio, no Pad; batch 1) feeds a 512x683 ADE20K image to
    the network as it is; zero-padding it to 512x704 changes the labels near the border."""
    model = semantic_model("uper").eval()
    assert model.test_size_divisor == 1 and model.size_divisor == 32
    shapes = _backbone_inputs(model)
    image = torch.randn(1, 3, 512, 683)
    with torch.no_grad():
        (prediction,) = model(image)
        head, stages = model.predict_stages(image)  # the network on the bare image
        model.test_size_divisor = 32
        (padded,) = model(image)
    assert shapes == [(1, 3, 512, 683), (1, 3, 512, 683), (1, 3, 512, 704)]
    expected = F.interpolate(stages[-1].mask_logits, size=(512, 683), mode="bilinear").argmax(1)[0]
    assert torch.equal(prediction.semantic.label_map, expected)
    assert prediction.semantic.class_logits.shape[-2:] == (128, 171)
    assert not torch.equal(prediction.semantic.label_map, padded.semantic.label_map)
    data = make_batch(0, 2, 100, 131)
    model.train()(data.images, [semantic_targets(t) for t in data.targets])
    assert shapes[-1] == (2, 3, 128, 160)  # training pads to size_divisor


def test_an_unpadded_batch_of_different_sizes_runs_each_image_alone_at_its_own_size() -> None:
    model = semantic_model("fcn").eval()
    shapes = _backbone_inputs(model)
    images = torch.randn(2, 3, 100, 131)
    sizes = [(100, 131), (90, 120)]
    with torch.no_grad():
        together = model(images, image_sizes=sizes)
        alone = model(images[1:, :, :90, :120])
    assert shapes == [(1, 3, 100, 131), (1, 3, 90, 120), (1, 3, 90, 120)]
    assert torch.equal(together[1].semantic.label_map, alone[0].semantic.label_map)
    with torch.no_grad():
        same_size = model(images)  # one forward pass when every image fills the batch
    assert shapes[-1] == (2, 3, 100, 131) and len(same_size) == 2


def test_dilated_heads_use_output_stride_8_and_a_256_channel_updator_on_512_channel_kernels() -> None:
    cfg = KNetConfig.for_task("semantic", num_thing_classes=0, num_stuff_classes=150, decode_head="psp")
    assert cfg.backbone.output_stride == 8 and cfg.channels == 512 and cfg.update.updator_channels == 256
    uper = KNetConfig.ade20k_semantic_upernet_r50()
    assert uper.backbone.output_stride == 32 and uper.channels == 256 and uper.update.updator_channels is None


def test_a_512_channel_semantic_stage_has_the_parameter_count_of_its_formula() -> None:
    """MHSA(512) + LN + KernelUpdator(256) + 1x1 feat_transform + FFN(2048) + LN + mask FC+LN + fc_mask;
    no classification branch (each kernel keeps its class)."""
    stage = KernelUpdateHead(
        num_classes=None,
        channels=512,
        conv_kernel_size=1,
        feedforward_channels=2048,
        num_heads=8,
        dropout=0.0,
        num_cls_fcs=1,
        num_mask_fcs=1,
        grouping="softmax",
        hard_mask_thr=0.5,
        updator_channels=256,
    )
    c = 512
    mhsa = 3 * c * c + 3 * c + c * c + c
    ffn = (c * 2048 + 2048) + (2048 * c + c)
    expected = mhsa + 2 * c + 463_104 + (c * c + c) + ffn + 2 * c + (c * c + 2 * c) + (c * c + c)
    assert sum(p.numel() for p in stage.parameters()) == expected == 4_403_968


def _conv_module(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + 2 * cout  # conv without bias + BatchNorm affine


def test_decode_heads_have_the_parameter_counts_of_the_mmseg_heads() -> None:
    c, top, levels = 512, 2048, [256, 512, 1024, 2048]
    fcn = _conv_module(top, c, 3) + _conv_module(c, c, 3) + _conv_module(top + c, c, 3)
    psp = 4 * _conv_module(top, c, 1) + _conv_module(top + 4 * c, c, 3)
    aspp = _conv_module(top, c, 1) * 2 + 3 * _conv_module(top, c, 3) + _conv_module(5 * c, c, 3)
    u = 256
    uper = (
        4 * _conv_module(top, u, 1)
        + _conv_module(top + 4 * u, u, 3)
        + sum(_conv_module(ci, u, 1) for ci in levels[:-1])
        + 3 * _conv_module(u, u, 3)
        + _conv_module(4 * u, u, 3)
    )
    counts = {
        "fcn": FCNHead(in_channels=top, channels=c),
        "psp": PSPHead(in_channels=top, channels=c),
        "aspp": ASPPHead(in_channels=top, channels=c),
        "uper": UPerHead(in_channels=levels, channels=u),
    }
    expected = {"fcn": fcn, "psp": psp, "aspp": aspp, "uper": uper}
    for name, head in counts.items():
        assert sum(p.numel() for p in head.parameters()) == expected[name], name


def _assert_kaiming_fan_out(name: str, head: torch.nn.Module) -> int:
    """Every conv of ``head``: no bias, N(0, sqrt(2 / fan_out)) with fan_out = out * k * k (mmcv's
    ConvModule init: kaiming-normal, mode 'fan_out', ReLU gain); every BatchNorm starts at (1, 0).
    The max |w| / std > 3.5 tells a normal draw from a uniform one (at most sqrt(3) = 1.73)."""
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    for index, conv in enumerate(convs):
        weight = conv.weight.detach()
        out, _, kh, kw = weight.shape
        expected = math.sqrt(2 / (out * kh * kw))
        measured = float(weight.std())
        assert conv.bias is None, (name, index)
        assert abs(measured / expected - 1) < 0.05, (name, index, measured, expected)
        assert abs(float(weight.mean())) < 0.05 * expected, (name, index)
        assert float(weight.abs().max()) / measured > 3.5, (name, index)
    for norm in (m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    return len(convs)


def test_decode_head_and_aux_convs_start_kaiming_normal_fan_out_as_mmcv_conv_modules() -> None:
    torch.manual_seed(0)
    c, top, levels = 512, 2048, [256, 512, 1024, 2048]
    heads = {
        "fcn": FCNHead(in_channels=top, channels=c),
        "psp": PSPHead(in_channels=top, channels=c),
        "aspp": ASPPHead(in_channels=top, channels=c),
        "uper": UPerHead(in_channels=levels, channels=256),
        "aux": FCNHead(in_channels=1024, channels=256, in_index=2, num_convs=1, concat_input=False),
    }
    counts = {name: _assert_kaiming_fan_out(name, head) for name, head in heads.items()}
    assert counts == {"fcn": 3, "psp": 5, "aspp": 6, "uper": 12, "aux": 1}


def test_the_built_semantic_model_keeps_the_classifiers_at_std_0_01_and_the_aux_head_kaiming() -> None:
    model = semantic_model("psp", channels=512)
    head = model.kernel_head
    assert head.aux_head is not None
    _assert_kaiming_fan_out("aux", head.aux_head[0])
    for classifier in (head.conv_seg, head.aux_head[2]):
        assert abs(float(classifier.weight.detach().std()) / 0.01 - 1) < 0.15 and not classifier.bias.any()


def test_initial_kernels_are_the_classifier_weights_without_bias() -> None:
    model = semantic_model("fcn", channels=64).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        head, _ = model.predict_stages(images)
        weight = model.kernel_head.conv_seg.weight[:, :, 0, 0]
        torch.testing.assert_close(head.kernels[0], weight)
        expected = (
            torch.einsum("kc,bchw->bkhw", weight, head.features)
            + model.kernel_head.conv_seg.bias[None, :, None, None]
        )
        torch.testing.assert_close(head.mask_logits, expected, rtol=1e-4, atol=1e-5)  # eval: no dropout
    assert head.seg_logits is None  # the auxiliary head runs only in training


def test_label_maps_take_the_first_covering_segment_and_ignore_the_rest_and_the_padding() -> None:
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 5, 7, generator=generator) > 0.6
    labels = torch.tensor([4, 1, 2])
    maps = label_maps(
        [{"labels": labels, "masks": masks}, {"labels": labels[:0], "masks": masks[:0]}],
        [(5, 7), (5, 7)],
        (8, 8),
    )
    expected = torch.full((2, 8, 8), 255, dtype=torch.int64)
    for y in range(5):
        for x in range(7):
            for label, mask in zip(labels, masks, strict=True):
                if mask[y, x]:
                    expected[0, y, x] = label
                    break
    assert torch.equal(maps, expected)


def test_cross_entropy_is_the_mean_over_all_pixels_with_ignored_ones_counting_zero() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 6, 6))
    labels[0, :2] = 255
    resized = F.interpolate(logits, size=(6, 6), mode="bilinear", align_corners=False)
    log_probs = resized.log_softmax(1)
    total = 0.0
    for b in range(2):
        for y in range(6):
            for x in range(6):
                if labels[b, y, x] != 255:
                    total -= log_probs[b, labels[b, y, x], y, x].item()
    assert cross_entropy(logits, labels).item() == pytest.approx(total / (2 * 36), rel=1e-5)


def test_loss_weights_scale_the_stage_and_auxiliary_losses() -> None:
    data = make_batch(0, 1, 64, 64)
    targets = [semantic_targets(t) for t in data.targets]
    base = semantic_model("fcn").train()
    torch.manual_seed(5)
    plain = base(data.images, targets)
    scaled = semantic_model("fcn", loss={"seg_weight": 2.0, "aux_weight": 0.8}).train()
    torch.manual_seed(5)
    doubled = scaled(data.images, targets)
    for key in plain:
        torch.testing.assert_close(doubled[key], 2 * plain[key])


@pytest.mark.slow
def test_small_semantic_model_drives_the_loss_down_and_reaches_miou_0_8_on_its_training_images() -> None:
    torch.manual_seed(0)
    model = semantic_model("uper", backbone={"name": "resnet18", "frozen_stages": -1, "norm_eval": False})
    data = make_batch(0, 4, 96, 96, num_things=2)
    targets = [semantic_targets(t) for t in data.targets]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    model.train()
    for step in range(120):
        batch = [(2 * step) % 4, (2 * step + 1) % 4]
        loss = sum(model(data.images[batch], [targets[i] for i in batch]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert first / last >= 5, f"loss went from {first:.3f} to {last:.3f}"

    model.eval()
    with torch.no_grad():
        predictions = model(data.images)
    truth = label_maps(targets, [(96, 96)] * 4, (96, 96))
    predicted = torch.stack([p.semantic.label_map for p in predictions])
    ious = []
    for label in range(NUM_CLASSES):  # brute-force IoU per class over the labelled pixels
        valid = truth != 255
        inter = ((predicted == label) & (truth == label) & valid).sum().item()
        union = (((predicted == label) | (truth == label)) & valid).sum().item()
        if union:
            ious.append(inter / union)
    miou = sum(ious) / len(ious)
    assert miou >= 0.8, f"mIoU {miou:.3f} on the training images"


def test_ade20k_preset_builds_upernet_on_a_deep_stem_resnet_with_150_class_kernels() -> None:
    model = build_model(KNetConfig.ade20k_semantic_upernet_r50()).eval()
    stem = model.backbone.body.conv1
    assert isinstance(stem, torch.nn.Sequential)  # ResNetV1c: three 3x3 convs instead of one 7x7
    with torch.no_grad():
        head, stages = model.predict_stages(torch.randn(1, 3, 64, 96))
    assert head.kernels.shape == (1, 150, 256) and len(stages) == 3
    assert stages[-1].mask_logits.shape == (1, 150, 16, 24)  # UPerNet fuses at stride 4
