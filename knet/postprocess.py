"""Last-stage logits -> per-image predictions: panoptic merge, instance top-k, semantic maps (spec §4).

Mask probabilities follow the reference's rescale: mask logits (stride 8) -> bilinear x mask_upsample_stride
-> sigmoid -> bilinear to the padded batch size -> crop to the image size (align_corners False throughout).
Predictions come back at each image's (unpadded) size, or, given ``output_sizes`` (each image's size
before the test-time resize), as the reference's ``rescale=True``: the cropped probabilities (semantic
variant: logits) are resized bilinearly to that size and thresholded and merged there.

Upstream's stuff_score_thr, iou_thr and stuff_max_area are never read by its merge code, so they are not
options here; the merge uses only mask_thr, instance_score_thr and overlap_thr.

Speed: at COCO size the full-resolution probabilities of 153 kernels are 150 M floats (600 MB). The
``PostProcessor`` never holds them all: ``full_resolution_pass`` resizes 8 kernels at a time into one
reused buffer and reduces each chunk at once to what the merge needs (the owner argmax, the prob >= mask_thr
areas of the kept kernels, the binary instance masks); an instance-only model resizes only its top-k
kernels. Bilinear resizing treats every kernel's map on its own, so the values are bit-identical to
resizing all kernels in one call; tests/knet/test_postprocess.py checks every output against a plain loop
that follows spec section 4. Figures: docs/performance.md, ``python -m benchmarks.postprocess``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from knet.structures import InstancePrediction, PanopticPrediction, Prediction, SemanticPrediction

CHUNK_BYTES = 32 * 2**20  # full-resolution float maps resized and reduced together: 8 at 800 x 1216


def stride4_probabilities(mask_logits: Tensor, upsample_stride: int) -> Tensor:
    """(B, N, h8, w8) logits -> (B, N, h8 * stride, w8 * stride) probabilities (bilinear, then sigmoid)."""
    logits = mask_logits.float()
    if upsample_stride == 1:
        return logits.sigmoid()
    upsampled = F.interpolate(logits, scale_factor=upsample_stride, mode="bilinear", align_corners=False)
    return upsampled.sigmoid_()  # a fresh tensor: sigmoid in place


def mask_probabilities(
    mask_logits: Tensor, image_size: tuple[int, int], padded_size: tuple[int, int], upsample_stride: int
) -> Tensor:
    """(N, h8, w8) logits of one image -> (N, H, W) probabilities at the image size (all at once: 4 bytes
    per kernel and pixel; the ``PostProcessor`` uses ``full_resolution_pass`` instead)."""
    probs = stride4_probabilities(mask_logits[None], upsample_stride)  # (1, N, h4, w4)
    probs = F.interpolate(probs, size=padded_size, mode="bilinear", align_corners=False)
    return probs[0, :, : image_size[0], : image_size[1]]


def kernels_per_chunk(padded_size: tuple[int, int]) -> int:
    """How many full-resolution maps to resize and reduce together: as many as fit in CHUNK_BYTES, so small
    images take one chunk and COCO-sized ones stay bounded."""
    return max(1, CHUNK_BYTES // (4 * padded_size[0] * padded_size[1]))


@dataclass
class FullResolution:
    """What the merge needs from the full-resolution probabilities; a field is None when not asked for.

    owner: (H, W) int64, argmax_k score_k * prob_k (first k on ties). mask_areas: (N,) int64, the number of
    pixels with prob_k >= mask_thr. instance_masks: (M, H, W) bool, prob > mask_thr of the requested kernels.
    """

    owner: Tensor | None = None
    mask_areas: Tensor | None = None
    instance_masks: Tensor | None = None


class _OwnerArgmax:
    """Running argmax over kernel chunks; a later chunk wins only where strictly better, as argmax does.

    All buffers are allocated once: fresh large tensors cost page faults on every call.
    """

    def __init__(self, size: tuple[int, int], device: torch.device) -> None:
        self.best = torch.empty(size, device=device)  # (H, W) best score * prob so far
        self.owner = torch.empty(size, dtype=torch.int64, device=device)  # (H, W) its kernel
        self._chunk_best, self._chunk_owner = torch.empty_like(self.best), torch.empty_like(self.owner)
        self._better = torch.empty(size, dtype=torch.bool, device=device)
        self._started = False

    def update(self, weighted: Tensor, first_kernel: int) -> None:
        """weighted: (c, H, W) score * prob of kernels first_kernel .. first_kernel + c - 1."""
        # max(0) gives the same first-maximum index as argmax(0) and is several times faster on CPU
        if not self._started:
            torch.max(weighted, 0, out=(self.best, self.owner))  # (c, H, W) -> (H, W)
            self.owner += first_kernel
            self._started = True
            return
        torch.max(weighted, 0, out=(self._chunk_best, self._chunk_owner))
        self._chunk_owner += first_kernel
        torch.gt(self._chunk_best, self.best, out=self._better)
        torch.where(self._better, self._chunk_best, self.best, out=self.best)
        torch.where(self._better, self._chunk_owner, self.owner, out=self.owner)


def _areas(probs: Tensor, mask_thr: float, above: Tensor | None = None) -> Tensor:
    """(c, H, W) -> (c,) int64 pixels with prob >= mask_thr (int32 sums: a bool -> int64 sum is 4x slower).
    above: an optional (c, H, W) bool buffer for the comparison."""
    above = torch.ge(probs, mask_thr, out=above) if above is not None else probs >= mask_thr
    return above.sum((1, 2), dtype=torch.int32).to(torch.int64)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[False, True, True, False, True] -> [(1, 3), (4, 5)]: the start/stop of each run of True."""
    runs: list[tuple[int, int]] = []
    for index, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        elif flag:
            runs.append((index, index + 1))
    return runs


def pixel_owner(scores: Tensor, mask_probs: Tensor) -> Tensor:
    """scores (N,), mask_probs (N, H, W) -> (H, W) int64: argmax_k score_k * prob_k per pixel."""
    step = kernels_per_chunk(mask_probs.shape[1:])
    argmax = _OwnerArgmax(mask_probs.shape[1:], mask_probs.device)
    weighted = torch.empty((min(step, mask_probs.shape[0]), *mask_probs.shape[1:]), device=mask_probs.device)
    for first in range(0, mask_probs.shape[0], step):
        chunk = mask_probs[first : first + step]
        out = weighted[: chunk.shape[0]]
        argmax.update(torch.mul(scores[first : first + step, None, None], chunk, out=out), first)
    return argmax.owner


def full_resolution_pass(
    probs: Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    *,
    mask_thr: float,
    owner_scores: Tensor | None = None,
    area_kernels: Tensor | None = None,
    instance_kernels: Tensor | None = None,
    output_size: tuple[int, int] | None = None,
) -> FullResolution:
    """probs (N, h4, w4) at stride 4 -> the full-resolution reductions asked for, a chunk of kernels at a time.

    The maps are resized to ``padded_size``, cropped to ``image_size`` and, when ``output_size`` differs
    from it, resized again (bilinear) to ``output_size``, where every reduction then happens.

    owner_scores (N,): compute the owner map with these scores. area_kernels (N,) bool: compute mask_areas
    for these kernels (0 for the others; the merge reads only the kept kernels' areas). instance_kernels
    (M,): the kernel of each instance mask (repeats allowed). Only the kernels some output needs are
    resized: all N for the owner, else those of the areas and the instance masks.
    """
    num_kernels = probs.shape[0]
    output_size = image_size if output_size is None else (int(output_size[0]), int(output_size[1]))
    rescale = tuple(output_size) != tuple(image_size)
    height, width = output_size
    device = probs.device
    if owner_scores is None and area_kernels is None and instance_kernels is None:
        raise ValueError("full_resolution_pass: ask for owner_scores, area_kernels or instance_kernels")
    with_area = [False] * num_kernels if area_kernels is None else area_kernels.tolist()
    instance_rows: dict[int, list[int]] = {}  # kernel -> its rows in instance_masks
    for row, kernel in enumerate([] if instance_kernels is None else instance_kernels.tolist()):
        instance_rows.setdefault(kernel, []).append(row)
    if owner_scores is not None:
        resized = list(range(num_kernels))
    else:
        resized = sorted({k for k in range(num_kernels) if with_area[k]} | set(instance_rows))
    result = FullResolution()
    if instance_kernels is not None:
        result.instance_masks = torch.empty(
            (len(instance_kernels), height, width), dtype=torch.bool, device=device
        )
    areas = torch.zeros(num_kernels, dtype=torch.int64, device=device)
    # buffers reused by every chunk (fresh large tensors cost page faults)
    largest = max(padded_size, output_size, key=lambda size: size[0] * size[1])  # the bigger buffer
    step = max(1, min(kernels_per_chunk(largest), len(resized)))
    resized_buffer = torch.empty((1, step, *padded_size), device=device)  # (1, c, Hp, Wp)
    rescaled_buffer = torch.empty((1, step, height, width), device=device) if rescale else None
    above = torch.empty((step, height, width), dtype=torch.bool, device=device)
    argmax = _OwnerArgmax(output_size, device) if owner_scores is not None else None
    for start in range(0, len(resized), step):
        kernels = resized[start : start + step]
        count = len(kernels)
        with record_function("knet.postprocess.resize"):
            if owner_scores is not None:
                source = probs[start : start + count]  # every kernel: a view
            else:
                source = probs[torch.tensor(kernels, device=device)]
            # = F.interpolate(source[None], size=padded_size, mode="bilinear"), written into the buffer
            torch.ops.aten.upsample_bilinear2d.out(
                source[None], list(padded_size), False, None, None, out=resized_buffer[:, :count]
            )
            chunk = resized_buffer[0, :count, : image_size[0], : image_size[1]]  # (c, h, w)
            if rescaled_buffer is not None:  # = F.interpolate(chunk[None], size=output_size, mode="bilinear")
                torch.ops.aten.upsample_bilinear2d.out(
                    chunk[None], list(output_size), False, None, None, out=rescaled_buffer[:, :count]
                )
                chunk = rescaled_buffer[0, :count]  # (c, H, W)
        with record_function("knet.postprocess.instance_masks"):
            for first, stop in _runs([kernel in instance_rows for kernel in kernels]):
                torch.gt(chunk[first:stop], mask_thr, out=above[: stop - first])
                for local in range(first, stop):
                    for row in instance_rows[kernels[local]]:
                        result.instance_masks[row].copy_(above[local - first])
        with record_function("knet.postprocess.mask_areas"):
            for first, stop in _runs([with_area[kernel] for kernel in kernels]):
                counted = _areas(chunk[first:stop], mask_thr, above[: stop - first])
                areas[torch.tensor(kernels[first:stop], device=device)] = counted
        if argmax is not None:
            with record_function("knet.postprocess.owner"):
                # in place: the chunk is not read after this
                argmax.update(chunk.mul_(owner_scores[start : start + count, None, None]), start)
    result.owner = argmax.owner if argmax is not None else None
    result.mask_areas = areas if area_kernels is not None else None
    return result


def kept_kernels(scores: Tensor, is_thing: Tensor, instance_score_thr: float) -> Tensor:
    """(N,) bool: the kernels the merge may turn into segments (things need the score; stuff always)."""
    return ~(is_thing & (scores < instance_score_thr))


def panoptic_merge(
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    mask_probs: Tensor | None,
    *,
    mask_thr: float,
    instance_score_thr: float,
    overlap_thr: float,
    owner: Tensor | None = None,
    mask_areas: Tensor | None = None,
) -> PanopticPrediction:
    """scores, labels, is_thing (N,); mask_probs (N, H, W) -> panoptic map with segment ids 1..M (0 = VOID).

    Every pixel goes to argmax_k score_k * prob_k over ALL kernels; then kernels are visited by descending
    score: things below ``instance_score_thr`` are dropped (their pixels stay VOID; stuff has no score
    threshold); a kept kernel becomes a segment when its claimed area > 0, its area with prob >= mask_thr
    is > 0, and claimed / that area >= ``overlap_thr``. Claimed regions are disjoint, so the decisions are
    independent and are taken for all kernels at once. Unlike the reference (ids from 0, colliding with
    VOID), segment ids start at 1, in descending score order. ``owner`` (H, W) = ``pixel_owner(scores,
    mask_probs)`` and ``mask_areas`` (N,) = the prob >= mask_thr pixel counts (only the ``kept_kernels``
    entries are read), when the caller already has them (``full_resolution_pass``); mask_probs may then be
    None.
    """
    num_kernels = scores.shape[0]
    if mask_probs is None and (owner is None or mask_areas is None):
        raise ValueError("panoptic_merge needs mask_probs unless both owner and mask_areas are given")
    owner = pixel_owner(scores, mask_probs) if owner is None else owner  # (H, W) kernel index
    if mask_areas is None:
        step = kernels_per_chunk(mask_probs.shape[1:])
        chunks = [mask_probs[first : first + step] for first in range(0, num_kernels, step)]
        mask_areas = torch.cat([_areas(chunk, mask_thr) for chunk in chunks])
    claimed = torch.bincount(owner.flatten(), minlength=num_kernels)  # (N,)
    kept = kept_kernels(scores, is_thing, instance_score_thr)
    # float64 like the reference's Python division, so no ratio near overlap_thr rounds to the other side
    ratio = claimed.double() / mask_areas.clamp(min=1).double()
    segment = kept & (claimed > 0) & (mask_areas > 0) & (ratio >= overlap_thr)
    order = torch.argsort(scores, descending=True, stable=True)
    ordered = order[segment[order]]  # the segment kernels, best first
    segment_ids = torch.zeros(num_kernels, dtype=torch.int64, device=scores.device)
    segment_ids[ordered] = torch.arange(1, ordered.numel() + 1, device=scores.device)
    return PanopticPrediction(
        segment_map=segment_ids.take(owner),  # = segment_ids[owner], 4x faster
        labels=labels[ordered].to(torch.int64),
        scores=scores[ordered],
        is_thing=is_thing[ordered],
    )


def top_pairs(class_probs: Tensor, max_per_image: int) -> tuple[Tensor, Tensor, Tensor]:
    """class_probs (P, T) -> scores, kernels, labels (top,) of the top ``max_per_image`` (kernel, class)
    pairs over the flattened scores, sorted by descending score."""
    num_classes = class_probs.shape[1]
    top = min(max_per_image, class_probs.numel())
    scores, flat = class_probs.flatten().topk(top, sorted=True)  # (P, T) -> (P*T,) -> (top,)
    return scores, torch.div(flat, num_classes, rounding_mode="floor"), flat % num_classes


def instance_topk(
    class_probs: Tensor, mask_probs: Tensor, *, max_per_image: int, mask_thr: float
) -> InstancePrediction:
    """class_probs (P, T) sigmoid scores, mask_probs (P, H, W) -> the top ``max_per_image`` (kernel, class)
    pairs over the flattened scores, no NMS and no threshold; one kernel may give several labels."""
    scores, kernels, labels = top_pairs(class_probs, max_per_image)
    masks = torch.empty((kernels.shape[0], *mask_probs.shape[1:]), dtype=torch.bool, device=mask_probs.device)
    for row, kernel in enumerate(kernels.tolist()):
        torch.gt(mask_probs[kernel], mask_thr, out=masks[row])  # no (M, H, W) float copy
    return InstancePrediction(masks=masks, labels=labels, scores=scores)


def semantic_from_kernels(
    scores: Tensor,
    labels: Tensor,
    mask_probs: Tensor | None,
    coarse_probs: Tensor,
    num_classes: int,
    *,
    owner: Tensor | None = None,
) -> SemanticPrediction:
    """Semantic map of a panoptic model. Rule: each kernel votes only for its own label with
    score * mask probability, a class's score is the best vote, and a pixel takes the best class; so the
    label map equals the labels of the panoptic argmax before any threshold. (A sum over kernels, as in
    Mask2Former, lets 100 low-score sigmoid kernels outvote a confident stuff kernel.)

    scores, labels (N,); mask_probs (N, H, W); coarse_probs (N, h, w) -> label_map (H, W),
    class_scores (num_classes, h, w) (0 for classes no kernel voted for). ``owner`` as in ``panoptic_merge``
    (mask_probs may then be None).
    """
    if owner is None:
        if mask_probs is None:
            raise ValueError("semantic_from_kernels needs mask_probs or owner")
        owner = pixel_owner(scores, mask_probs)  # (H, W)
    votes = scores[:, None, None] * coarse_probs  # (N, h, w)
    class_scores = votes.new_zeros((num_classes, *votes.shape[1:]))
    index = labels[:, None, None].expand(votes.shape)
    class_scores.scatter_reduce_(0, index, votes, "amax")  # (N, h, w) -> (K, h, w)
    return SemanticPrediction(label_map=labels.to(torch.int64).take(owner), class_scores=class_scores)


def semantic_inference(
    class_logits: Tensor,
    image_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    output_sizes: list[tuple[int, int]] | None = None,
) -> list[SemanticPrediction]:
    """Semantic variant: class_logits (B, K, h, w) -> bilinear to the padded size, crop, (bilinear to the
    output size), argmax.

    class_logits (raw) and class_scores (their softmax) stay at the coarse (h, w) resolution over the
    whole padded frame.
    """
    predictions = []
    for b, (height, width) in enumerate(image_sizes):
        logits = F.interpolate(
            class_logits[b : b + 1].float(), size=padded_size, mode="bilinear", align_corners=False
        )
        logits = logits[:, :, :height, :width]
        if output_sizes is not None and tuple(output_sizes[b]) != (height, width):
            size = (int(output_sizes[b][0]), int(output_sizes[b][1]))
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        label_map = logits[0].max(0).indices  # (K, H, W) -> (H, W); = argmax, faster
        coarse = class_logits[b].detach().float()
        predictions.append(
            SemanticPrediction(label_map=label_map, class_scores=coarse.softmax(0), class_logits=coarse)
        )
    return predictions


class PostProcessor:
    """(B, N, K) class logits + (B, N, h8, w8) mask logits -> one ``Prediction`` per image.

    Kernels are laid out as ``num_proposals`` thing kernels, then (panoptic) the S stuff kernels, stuff
    kernel j owning class T + j.
    """

    def __init__(
        self,
        *,
        task: Literal["panoptic", "instance"],
        num_thing_classes: int,
        num_stuff_classes: int,
        num_proposals: int,
        max_per_image: int = 100,
        mask_thr: float = 0.5,
        instance_score_thr: float = 0.3,
        overlap_thr: float = 0.6,
        panoptic_on: bool,
        instance_on: bool,
        semantic_on: bool,
        mask_upsample_stride: int = 2,
    ) -> None:
        if task not in ("panoptic", "instance"):
            raise ValueError(
                f"task must be 'panoptic' or 'instance', got {task!r} (semantic: semantic_inference)"
            )
        if task == "instance" and (panoptic_on or semantic_on or num_stuff_classes):
            raise ValueError(
                "an instance model has no stuff kernels: set num_stuff_classes=0, panoptic_on=False, semantic_on=False"
            )
        if not (panoptic_on or instance_on or semantic_on):
            raise ValueError("switch on at least one of panoptic_on, instance_on, semantic_on")
        if max_per_image < 1:
            raise ValueError(f"max_per_image must be >= 1, got {max_per_image}")
        for name, value in (
            ("mask_thr", mask_thr),
            ("instance_score_thr", instance_score_thr),
            ("overlap_thr", overlap_thr),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.task = task
        self.num_thing_classes, self.num_stuff_classes = num_thing_classes, num_stuff_classes
        self.num_proposals = num_proposals
        self.max_per_image, self.mask_thr = max_per_image, mask_thr
        self.instance_score_thr, self.overlap_thr = instance_score_thr, overlap_thr
        self.panoptic_on, self.instance_on, self.semantic_on = panoptic_on, instance_on, semantic_on
        self.mask_upsample_stride = mask_upsample_stride

    def __call__(
        self,
        cls_logits: Tensor,
        mask_logits: Tensor,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
        output_sizes: list[tuple[int, int]] | None = None,
    ) -> list[Prediction]:
        """output_sizes: per image, the size to predict at (see the module docstring); None: image_sizes."""
        expected = self.num_proposals + self.num_stuff_classes
        if cls_logits is None or mask_logits.shape[1] != expected or cls_logits.shape[1] != expected:
            got = None if cls_logits is None else tuple(cls_logits.shape)
            raise ValueError(
                f"expected {expected} kernels (num_proposals + num_stuff_classes) with class logits, got "
                f"cls_logits {got} and mask_logits {tuple(mask_logits.shape)}"
            )
        probs = stride4_probabilities(mask_logits, self.mask_upsample_stride)  # (B, N, h4, w4), one call
        outputs = image_sizes if output_sizes is None else output_sizes
        return [
            self._one_image(
                cls_logits[b].float().sigmoid(), mask_logits[b], probs[b], size, padded_size, outputs[b]
            )
            for b, size in enumerate(image_sizes)
        ]

    def _one_image(
        self,
        class_probs: Tensor,
        mask_logits: Tensor,
        probs: Tensor,
        size: tuple[int, int],
        padded_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Prediction:
        """class_probs (N, K) sigmoid; mask_logits (N, h8, w8); probs (N, h4, w4) mask probabilities."""
        size = (int(size[0]), int(size[1]))
        output_size = (int(output_size[0]), int(output_size[1]))
        prediction = Prediction(image_size=output_size)
        things = class_probs[: self.num_proposals, : self.num_thing_classes]  # (P, T)
        instance = top_pairs(things, self.max_per_image) if self.instance_on else None
        scores = labels = is_thing = kept = None
        if self.panoptic_on or self.semantic_on:
            scores, labels, is_thing = self._kernel_scores(class_probs, things)
            kept = kept_kernels(scores, is_thing, self.instance_score_thr)
        full = full_resolution_pass(
            probs,
            size,
            padded_size,
            mask_thr=self.mask_thr,
            owner_scores=scores,  # the owner map is shared by the panoptic and semantic parts
            area_kernels=kept if self.panoptic_on else None,
            instance_kernels=instance[1] if instance is not None else None,
            output_size=output_size,
        )
        if instance is not None:
            prediction.instance = InstancePrediction(
                masks=full.instance_masks, labels=instance[2], scores=instance[0]
            )
        if self.panoptic_on:
            prediction.panoptic = panoptic_merge(
                scores,
                labels,
                is_thing,
                None,
                mask_thr=self.mask_thr,
                instance_score_thr=self.instance_score_thr,
                overlap_thr=self.overlap_thr,
                owner=full.owner,
                mask_areas=full.mask_areas,
            )
        if self.semantic_on:
            prediction.semantic = semantic_from_kernels(
                scores,
                labels,
                None,
                mask_logits.float().sigmoid(),
                self.num_thing_classes + self.num_stuff_classes,
                owner=full.owner,
            )
        return prediction

    def _kernel_scores(self, class_probs: Tensor, things: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Thing kernels: best thing class; stuff kernel j: its own class T + j. -> scores, labels, is_thing (N,)."""
        thing_scores, thing_labels = things.max(1)
        stuff_block = class_probs[self.num_proposals :, self.num_thing_classes :]  # (S, S)
        stuff_scores = stuff_block.diagonal()
        stuff_labels = (
            torch.arange(self.num_stuff_classes, device=class_probs.device) + self.num_thing_classes
        )
        scores = torch.cat([thing_scores, stuff_scores])
        labels = torch.cat([thing_labels, stuff_labels])
        is_thing = torch.arange(scores.shape[0], device=scores.device) < self.num_proposals
        return scores, labels, is_thing
