"""KNet: backbone -> neck -> kernel head -> S KernelUpdateHeads, with its loss and post-processing.

Panoptic/instance: FPN + ConvKernelHead; semantic: no neck + SemanticKernelHead (knet/build.py).

Training returns the criterion's weighted loss dict; evaluation returns one ``Prediction`` per image
(docs/interfaces.md section 2). Inputs are validated here so that mistakes name the offending field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from knet.backbone import TimmBackbone
from knet.structures import KernelHeadOutput, Prediction, StageOutput
from knet.update_stage import KernelUpdateHead

Criterion = Callable[..., dict[str, Tensor]]
PostProcessor = Callable[..., list[Prediction]]


class KNet(nn.Module):
    """forward(images (B, 3, H, W) float, targets=None, image_sizes=None, output_sizes=None).

    train(): dict[str, Tensor] of weighted losses (sum them). eval(): list[Prediction] at each image's size.
    ``image_sizes`` (per image (h, w) <= (H, W)) is None when every image fills the batch tensor.
    ``output_sizes`` (eval only; per image, usually its size before the test-time resize): predict at
    that size instead, resizing probabilities bilinearly before thresholds and merging, as the
    reference's ``rescale=True`` does.
    Images are zero-padded bottom/right to a multiple of ``size_divisor`` before the backbone in training
    and to a multiple of ``test_size_divisor`` in eval mode. ``test_size_divisor`` 1 means no padding, as
    mmseg's test pipeline: then each image of a batch whose images differ in size runs alone at its own
    size, so the batch's padding never reaches the network either.
    """

    def __init__(
        self,
        *,
        backbone: TimmBackbone,
        neck: nn.Module,
        kernel_head: nn.Module,
        stages: Sequence[KernelUpdateHead],
        criterion: Criterion,
        postprocessor: PostProcessor,
        num_classes: int,
        size_divisor: int,
        test_size_divisor: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.kernel_head = kernel_head
        self.stages = nn.ModuleList(stages)
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.num_classes = num_classes
        self.size_divisor = size_divisor
        self.test_size_divisor = test_size_divisor

    def forward(
        self,
        images: Tensor,
        targets: list[dict[str, Any]] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        output_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[Prediction]:
        sizes = self._check_images(images, image_sizes)
        outputs = self._check_output_sizes(output_sizes, len(sizes))
        if self.training:
            if targets is None:
                raise ValueError("targets is required in train mode (call model.eval() for predictions)")
            if outputs is not None:
                raise ValueError("output_sizes applies to predictions: call model.eval() first")
            self._check_targets(targets, sizes)
        batch_size = tuple(images.shape[-2:])
        if not self.training and self.test_size_divisor == 1 and any(s != batch_size for s in sizes):
            return self._predict_each_unpadded(images, sizes, outputs)
        padded = self._pad(images, self.size_divisor if self.training else self.test_size_divisor)
        padded_size = (padded.shape[-2], padded.shape[-1])
        head, stages = self.predict_stages(padded)
        if self.training:
            with record_function("knet.criterion"):
                return self.criterion(
                    head=head, stages=stages, targets=targets, image_sizes=sizes, padded_size=padded_size
                )
        return self._postprocess(head, stages, sizes, padded_size, outputs)

    def _predict_each_unpadded(
        self, images: Tensor, sizes: list[tuple[int, int]], outputs: list[tuple[int, int]] | None
    ) -> list[Prediction]:
        """Eval without padding: each image cropped to its own size (the batch's padding removed) and run
        alone, as mmseg tests one unpadded image at a time."""
        predictions: list[Prediction] = []
        for index, (height, width) in enumerate(sizes):
            image = images[index : index + 1, :, :height, :width]  # (1, 3, h, w)
            head, stages = self.predict_stages(image)
            output = [outputs[index]] if outputs is not None else None
            predictions += self._postprocess(head, stages, [(height, width)], (height, width), output)
        return predictions

    def _postprocess(
        self,
        head: KernelHeadOutput,
        stages: list[StageOutput],
        sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
        outputs: list[tuple[int, int]] | None,
    ) -> list[Prediction]:
        with record_function("knet.postprocess"):
            last = stages[-1] if stages else None
            cls_logits = last.cls_logits if last is not None else None
            mask_logits = last.mask_logits if last is not None else head.mask_logits
            return self.postprocessor(
                cls_logits=cls_logits,
                mask_logits=mask_logits,
                image_sizes=sizes,
                padded_size=padded_size,
                output_sizes=outputs,
            )

    def predict_stages(self, padded: Tensor) -> tuple[KernelHeadOutput, list[StageOutput]]:
        """The network without losses: padded images (B, 3, Hp, Wp) -> initial head output + every stage."""
        with record_function("knet.backbone"):
            features = self.backbone(padded)
        with record_function("knet.neck"):
            pyramid = self.neck(features)
        with record_function("knet.kernel_head"):
            head = self.kernel_head(pyramid)
        stages: list[StageOutput] = []
        kernels, mask_logits = head.kernels, head.mask_logits
        with record_function("knet.update_stages"):
            for stage in self.stages:
                output = stage(head.features, kernels, mask_logits)
                stages.append(output)
                kernels, mask_logits = output.kernels, output.mask_logits
        return head, stages

    @staticmethod
    def _pad(images: Tensor, divisor: int) -> Tensor:
        height, width = images.shape[-2:]
        pad_h = -height % divisor
        pad_w = -width % divisor
        if pad_h == 0 and pad_w == 0:
            return images
        return F.pad(images, (0, pad_w, 0, pad_h))  # zeros at the bottom/right

    @staticmethod
    def _check_output_sizes(
        output_sizes: Sequence[tuple[int, int]] | None, batch: int
    ) -> list[tuple[int, int]] | None:
        if output_sizes is None:
            return None
        if len(output_sizes) != batch:
            raise ValueError(
                f"output_sizes has {len(output_sizes)} entries but images has batch size {batch}"
            )
        checked = []
        for index, size in enumerate(output_sizes):
            h, w = (int(size[0]), int(size[1]))
            if h <= 0 or w <= 0:
                raise ValueError(f"output_sizes[{index}] = {(h, w)} must be positive")
            checked.append((h, w))
        return checked

    @staticmethod
    def _check_images(images: Tensor, image_sizes: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (normalised), got dtype {images.dtype}")
        batch, _, height, width = images.shape
        if image_sizes is None:
            return [(int(height), int(width))] * batch
        if len(image_sizes) != batch:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries but images has batch size {batch}")
        sizes = []
        for index, size in enumerate(image_sizes):
            h, w = (int(v) for v in size)
            if not (0 < h <= height and 0 < w <= width):
                raise ValueError(
                    f"image_sizes[{index}] = {(h, w)} must be positive and fit in the batch ({height}, {width})"
                )
            sizes.append((h, w))
        return sizes

    def _check_targets(self, targets: list[dict[str, Any]], sizes: list[tuple[int, int]]) -> None:
        if not isinstance(targets, (list, tuple)):
            raise ValueError(f"targets must be a list with one dict per image, got {type(targets).__name__}")
        if len(targets) != len(sizes):
            raise ValueError(f"len(targets) = {len(targets)} must equal the batch size {len(sizes)}")
        for index, (target, size) in enumerate(zip(targets, sizes, strict=True)):
            if not isinstance(target, Mapping):
                raise ValueError(
                    f"targets[{index}] must be a dict with 'labels' and 'masks', got {type(target).__name__}"
                )
            labels, masks = target.get("labels"), target.get("masks")
            if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
                raise ValueError(f"targets[{index}]['labels'] must be an int64 tensor of shape (M,)")
            if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
                got = (
                    f"{masks.dtype} {tuple(masks.shape)}"
                    if isinstance(masks, Tensor)
                    else type(masks).__name__
                )
                raise ValueError(f"targets[{index}]['masks'] must be a bool tensor (M, h, w), got {got}")
            if masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"targets[{index}]: masks has {masks.shape[0]} masks but labels has {labels.shape[0]} entries"
                )
            if tuple(masks.shape[-2:]) != size:
                raise ValueError(
                    f"targets[{index}]['masks'] size {tuple(masks.shape[-2:])} must equal the image size {size} "
                    "(image_sizes[i], or the batch size when image_sizes is None)"
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"targets[{index}]['labels'] must be in [0, {self.num_classes}), "
                    f"got values {labels.min().item()}..{labels.max().item()}"
                )
