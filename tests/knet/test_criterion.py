"""KNetCriterion: every loss term against a direct re-computation of the spec formulas (§1, §2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from knet.criterion import KNetCriterion
from knet.matcher import HungarianMatcher
from knet.structures import KernelHeadOutput, StageOutput
from knet.targets import prepare_targets

THINGS, STUFF, PROPOSALS = 3, 2, 4
PADDED = (32, 32)
SIZES = [(32, 32), (27, 30)]


def _criterion(panoptic: bool = True) -> KNetCriterion:
    return KNetCriterion(
        num_thing_classes=THINGS,
        num_stuff_classes=STUFF if panoptic else 0,
        num_proposals=PROPOSALS,
        panoptic=panoptic,
        matcher=HungarianMatcher(),
        use_rank_loss=panoptic,
    )


def _inputs(generator: torch.Generator, panoptic: bool = True, num_stages: int = 2):
    kernels = PROPOSALS + (STUFF if panoptic else 0)
    classes = THINGS + (STUFF if panoptic else 0)
    h8, w8 = PADDED[0] // 8, PADDED[1] // 8
    head = KernelHeadOutput(
        features=torch.randn(2, 8, h8, w8, generator=generator),
        kernels=torch.randn(2, kernels, 8, generator=generator),
        mask_logits=torch.randn(2, kernels, h8, w8, generator=generator).requires_grad_(),
        seg_logits=torch.randn(2, classes, h8, w8, generator=generator).requires_grad_(),
    )
    stages = [
        StageOutput(
            cls_logits=torch.randn(2, kernels, classes, generator=generator).requires_grad_(),
            mask_logits=(torch.randn(2, kernels, h8, w8, generator=generator) * 3).requires_grad_(),
            kernels=torch.randn(2, kernels, 8, generator=generator),
        )
        for _ in range(num_stages)
    ]
    return head, stages


def _gt(panoptic: bool = True) -> list[dict]:
    first = torch.zeros(4, *SIZES[0], dtype=torch.bool)
    first[0, 2:12, 3:15] = True
    first[1, 14:30, 5:20] = True
    first[2, 20:, 20:] = True  # stuff class THINGS + 1
    first[3, :2] = True  # stuff class THINGS
    second = torch.zeros(3, *SIZES[1], dtype=torch.bool)
    second[0, 5:25, 1:9] = True
    second[1, 0:10, 12:29] = True
    second[2, 20:, 10:] = True  # crowd thing
    labels_first = [0, 2, THINGS + 1, THINGS] if panoptic else [0, 2, 1, 1]
    return [
        {"labels": torch.tensor(labels_first), "masks": first},
        {"labels": torch.tensor([1, 1, 0]), "masks": second, "iscrowd": torch.tensor([False, False, True])},
    ]


def _up(logits: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)


def _positives(assignment, prepared, panoptic: bool) -> list[list[tuple[int, int, torch.Tensor]]]:
    """(kernel, label, soft mask) per image, ascending kernel index, written out one by one."""
    result = []
    for (rows, cols), target in zip(assignment, prepared):
        items = [(int(r), int(target.thing_labels[c]), target.thing_masks[c]) for r, c in zip(rows, cols)]
        if panoptic:
            for label, mask in zip(target.stuff_labels.tolist(), target.stuff_masks):
                items.append((PROPOSALS + label - THINGS, label, mask))
        result.append(sorted(items, key=lambda item: item[0]))
    return result


def _focal(logit: torch.Tensor, target: float) -> torch.Tensor:
    p = logit.sigmoid()
    ce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    p_t = p if target == 1 else 1 - p
    alpha = 0.25 if target == 1 else 0.75
    return alpha * (1 - p_t) ** 2 * ce


def _reference_stage(cls_logits, mask_logits, positives, panoptic: bool) -> dict[str, float]:
    """Each stage loss recomputed with loops and the unvectorised formulas (unweighted)."""
    batch, kernels, classes = cls_logits.shape
    num_pos = sum(len(p) for p in positives)
    focal = 0.0
    for b in range(batch):
        label_of = {k: label for k, label, _ in positives[b]}
        for n in range(kernels):
            for c in range(classes):
                if panoptic and n < PROPOSALS and c >= THINGS:
                    weight = 0.0  # thing kernels ignore stuff logits
                elif panoptic and n >= PROPOSALS:
                    weight = 1.0 if c == THINGS + n - PROPOSALS else 0.0  # stuff kernel: own logit only
                else:
                    weight = 1.0
                focal += weight * _focal(cls_logits[b, n, c], 1.0 if label_of.get(n) == c else 0.0).item()
    bce_sum, pixels, dice = 0.0, 0, []
    for b in range(batch):
        for kernel, _, mask in positives[b]:
            logit = mask_logits[b, kernel]
            bce_sum += F.binary_cross_entropy_with_logits(logit, mask, reduction="sum").item()
            pixels += mask.numel()
            p = logit.sigmoid()
            dice.append(1 - 2 * (p * mask).sum() / ((p * p).sum() + 1e-3 + (mask * mask).sum() + 1e-3))
    rank_sum = 0.0
    for b in range(batch):
        rank = torch.full(mask_logits.shape[-2:], 255, dtype=torch.int64)
        for kernel, _, mask in positives[b]:
            rank[mask > 0] = kernel
        log_softmax = mask_logits[b].log_softmax(0)
        for y, x in zip(*torch.nonzero(rank != 255, as_tuple=True)):
            rank_sum -= log_softmax[rank[y, x], y, x].item()
    return {
        "loss_cls": focal / max(num_pos, 1),
        "loss_mask": bce_sum / pixels if pixels else 0.0,
        "loss_dice": torch.stack(dice).mean().item() if dice else 0.0,
        "loss_rank": rank_sum / (batch * mask_logits.shape[-2] * mask_logits.shape[-1]),
    }


@pytest.mark.parametrize("panoptic", [True, False])
def test_stage_losses_equal_the_formulas_with_stuff_label_weights(panoptic: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    head, stages = _inputs(generator, panoptic)
    targets = _gt(panoptic)
    losses = _criterion(panoptic)(head, stages, targets, SIZES, PADDED)
    prepared = prepare_targets(
        targets, SIZES, PADDED, num_thing_classes=THINGS, num_stuff_classes=STUFF if panoptic else 0
    )
    matcher = HungarianMatcher()
    previous_masks, previous_cls = _up(head.mask_logits[:, :PROPOSALS]).detach(), None
    weights = {"loss_cls": 2.0, "loss_mask": 1.0, "loss_dice": 4.0, "loss_rank": 0.1}
    for index, stage in enumerate(stages):
        assignment = matcher(previous_masks, previous_cls, prepared)
        masks = _up(stage.mask_logits).detach()
        expected = _reference_stage(
            stage.cls_logits.detach(), masks, _positives(assignment, prepared, panoptic), panoptic
        )
        for name, value in expected.items():
            key = f"s{index}.{name}"
            if name == "loss_rank" and not panoptic:
                assert key not in losses
                continue
            assert losses[key].item() == pytest.approx(weights[name] * value, rel=1e-4, abs=1e-6), key
        previous_masks = masks[:, :PROPOSALS]
        previous_cls = stage.cls_logits[:, :PROPOSALS, :THINGS].detach()


@pytest.mark.parametrize("panoptic", [True, False])
def test_rpn_losses_equal_the_formulas_including_dense_seg_focal(panoptic: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    head, stages = _inputs(generator, panoptic, num_stages=1)
    targets = _gt(panoptic)
    losses = _criterion(panoptic)(head, stages, targets, SIZES, PADDED)
    prepared = prepare_targets(
        targets, SIZES, PADDED, num_thing_classes=THINGS, num_stuff_classes=STUFF if panoptic else 0
    )
    rpn_masks = _up(head.mask_logits[:, :PROPOSALS]).detach()
    assignment = HungarianMatcher()(rpn_masks, None, prepared)
    positives = _positives(assignment, prepared, panoptic=False)
    dummy_cls = torch.zeros(2, PROPOSALS, THINGS)
    expected = _reference_stage(dummy_cls, rpn_masks, positives, panoptic=False)
    assert losses["rpn.loss_mask"].item() == pytest.approx(expected["loss_mask"], rel=1e-4)
    assert losses["rpn.loss_dice"].item() == pytest.approx(4.0 * expected["loss_dice"], rel=1e-4)
    if panoptic:
        assert losses["rpn.loss_rank"].item() == pytest.approx(0.1 * expected["loss_rank"], rel=1e-4)
    else:
        assert "rpn.loss_rank" not in losses
    # dense seg targets: stuff pixels (mask > 0) first, matched things (mask > 0) overwrite, rest background
    seg = _up(head.seg_logits).detach()
    channels = seg.shape[1]
    total, labelled = 0.0, 0
    for b, target in enumerate(prepared):
        class_map = torch.full(seg.shape[-2:], channels, dtype=torch.int64)
        for label, mask in zip(target.stuff_labels.tolist(), target.stuff_masks):
            class_map[mask > 0] = label
        for _, label, mask in sorted(positives[b], key=lambda item: item[0]):
            class_map[mask > 0] = label
        labelled += int((class_map < channels).sum())
        for y in range(seg.shape[-2]):
            for x in range(seg.shape[-1]):
                for c in range(channels):
                    total += _focal(seg[b, c, y, x], 1.0 if class_map[y, x] == c else 0.0).item()
    assert losses["rpn.loss_seg"].item() == pytest.approx(total / max(labelled, 1), rel=1e-4)


def test_zero_object_batch_gives_finite_losses_with_zero_mask_and_dice() -> None:
    generator = torch.Generator().manual_seed(2)
    head, stages = _inputs(generator, panoptic=True)
    empty = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, *s, dtype=torch.bool)}
        for s in SIZES
    ]
    losses = _criterion(True)(head, stages, empty, SIZES, PADDED)
    assert set(losses) == {
        "rpn.loss_mask", "rpn.loss_dice", "rpn.loss_rank", "rpn.loss_seg",
        *(f"s{i}.{name}" for i in range(2) for name in ("loss_cls", "loss_mask", "loss_dice", "loss_rank")),
    }  # fmt: skip
    for key, value in losses.items():
        assert math.isfinite(value.item()), key
        if "loss_mask" in key or "loss_dice" in key or "loss_rank" in key:
            assert value.item() == 0.0, key
    assert losses["s0.loss_cls"].item() > 0  # every kernel is a negative
    total = sum(losses.values())
    total.backward()
    assert head.mask_logits.grad is not None and torch.isfinite(stages[1].cls_logits.grad).all()


def test_losses_backpropagate_to_every_prediction() -> None:
    generator = torch.Generator().manual_seed(3)
    head, stages = _inputs(generator, panoptic=True)
    sum(_criterion(True)(head, stages, _gt(True), SIZES, PADDED).values()).backward()
    for tensor in (
        head.mask_logits,
        head.seg_logits,
        *(s.mask_logits for s in stages),
        *(s.cls_logits for s in stages),
    ):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_constructor_rejects_stuff_classes_without_panoptic() -> None:
    with pytest.raises(ValueError, match="num_stuff_classes"):
        KNetCriterion(
            num_thing_classes=3, num_stuff_classes=2, num_proposals=4, panoptic=False,
            matcher=HungarianMatcher(), use_rank_loss=False,
        )  # fmt: skip


def _rank_batch(rank: int) -> tuple[list[dict], list[tuple[int, int]]]:
    """Rank 0: the usual batch (6 positives); rank 1: its second image twice (4 positives)."""
    if rank == 0:
        return _gt(True), SIZES
    return _gt(True)[1:] * 2, [SIZES[1]] * 2


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        generator = torch.Generator().manual_seed(10 + rank)
        head, stages = _inputs(generator, panoptic=True, num_stages=1)
        targets, sizes = _rank_batch(rank)
        losses = _criterion(True)(head, stages, targets, sizes, PADDED)
        torch.save(
            {"loss_cls": losses["s0.loss_cls"].detach(), "cls": stages[0].cls_logits.detach()},
            f"{out_dir}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_class_loss_divides_by_positives_averaged_over_ranks(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    counts = {0: 2 + 2 + 2, 1: 2 + 2}  # matched things + present stuff per rank (crowd excluded)
    mean_count = (counts[0] + counts[1]) / 2
    for rank in (0, 1):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        single = _criterion(True)
        generator = torch.Generator().manual_seed(10 + rank)
        head, stages = _inputs(generator, panoptic=True, num_stages=1)
        targets, sizes = _rank_batch(rank)
        local = single(head, stages, targets, sizes, PADDED)["s0.loss_cls"].item()  # no process group here
        assert result["loss_cls"].item() == pytest.approx(local * counts[rank] / mean_count, rel=1e-5)
