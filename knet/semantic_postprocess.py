"""The semantic variant's predictions: the last stage's class logits -> a per-pixel class map."""

from __future__ import annotations

from torch import Tensor

from knet.postprocess import semantic_inference
from knet.structures import Prediction


class SemanticPostProcessor:
    """(B, K, h, w) class logits of the last stage -> one ``Prediction`` (semantic part) per image.

    Whole-image inference as mmseg's 'whole' mode: bilinear to the padded input, crop, (bilinear to
    the output size, as ``rescale=True`` does with the original size), argmax.
    """

    def __call__(
        self,
        *,
        cls_logits: Tensor | None,
        mask_logits: Tensor,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
        output_sizes: list[tuple[int, int]] | None = None,
    ) -> list[Prediction]:
        semantic = semantic_inference(mask_logits, image_sizes, padded_size, output_sizes)
        return [
            Prediction(image_size=(int(size[0]), int(size[1])), semantic=part)
            for size, part in zip(output_sizes or image_sizes, semantic, strict=True)
        ]
