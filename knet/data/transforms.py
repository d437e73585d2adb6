"""Train/test transforms applied to an image and its masks together (torch only).

Images stay uint8 (3, h, w) until ``normalize``; masks are bool (M, h, w). Randomness comes only
from the ``torch.Generator`` passed in, so a seed fixes every choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from knet.data.config import TransformConfig


def scaled_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """Size with the short side at ``short_side`` unless that pushes the long side past ``max_size``."""
    scale = min(short_side / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(
    image: torch.Tensor, target: dict[str, Any], size: tuple[int, int]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Bilinear image, nearest masks (same pixel-centre mapping); segments emptied are dropped."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, target
    image = resize_image(image, size)
    masks = target["masks"]
    if masks.shape[0] == 0:  # interpolate refuses empty batches
        masks = torch.zeros(0, *size, dtype=torch.bool)
    else:
        masks = F.interpolate(masks[None].to(torch.uint8), size=size, mode="nearest-exact")[
            0
        ].bool()  # (M, h, w)
    return image, _keep_nonempty({**target, "masks": masks})


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, w) -> uint8 (3, *size), bilinear (align_corners=False), rounded."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


def hflip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    return image.flip(-1), {**target, "masks": target["masks"].flip(-1)}


def crop(
    image: torch.Tensor, target: dict[str, Any], top: int, left: int, height: int, width: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Crop both; a segment cut in pieces stays one segment, one emptied by the crop is dropped."""
    image = image[:, top : top + height, left : left + width]
    masks = target["masks"][:, top : top + height, left : left + width]
    return image, _keep_nonempty({**target, "masks": masks})


def _keep_nonempty(target: dict[str, Any]) -> dict[str, Any]:
    keep = target["masks"].flatten(1).any(1)  # (M,)
    if bool(keep.all()):
        return target
    out = dict(target)
    for key in ("labels", "masks", "iscrowd"):
        if key in out:
            out[key] = out[key][keep]
    return out


def normalize(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (3, h, w) RGB -> float (3, h, w) ``(x - mean) / std``."""
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (image.float() - mean_t) / std_t


def denormalize(
    image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], size: tuple[int, int]
) -> np.ndarray:
    """The inverse of ``normalize`` for drawing: (3, H, W) normalised float image (possibly padded,
    on any device) -> (h, w, 3) uint8 RGB array cropped to its unpadded ``size`` (h, w)."""
    mean_t = torch.tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
    std_t = torch.tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
    rgb = (image[:, : size[0], : size[1]] * std_t + mean_t).round().clamp(0, 255)  # round: 99.99997 is 100
    return rgb.permute(1, 2, 0).to(torch.uint8).cpu().numpy()  # (3, h, w) -> (h, w, 3)


def train_transform(
    image: torch.Tensor, target: dict[str, Any], cfg: TransformConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """Multi-scale resize, random flip, random crop, normalise. Returns (image, target, info)."""
    image, target, info = train_geometry(image, target, cfg, generator)
    return normalize(image, cfg.mean, cfg.std), target, info


def train_geometry(
    image: torch.Tensor, target: dict[str, Any], cfg: TransformConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """:func:`train_transform` before normalising: the image stays uint8 (3, h, w), a quarter of the
    bytes, for samples prepared in one process and trained on in another."""
    h, w = image.shape[-2:]
    if cfg.train_short_sides is not None:
        pick = int(torch.randint(len(cfg.train_short_sides), (), generator=generator))
        short = cfg.train_short_sides[pick]
    else:
        lo, hi = cfg.train_short_range
        short = int(torch.randint(lo, hi + 1, (), generator=generator))
    image, target = resize(image, target, scaled_size(h, w, short, cfg.max_size))
    flipped = bool(torch.rand((), generator=generator) < cfg.flip_prob)
    if flipped:
        image, target = hflip(image, target)
    if cfg.crop_size is not None:
        h, w = image.shape[-2:]
        ch, cw = min(cfg.crop_size[0], h), min(cfg.crop_size[1], w)
        top = int(torch.randint(h - ch + 1, (), generator=generator))
        left = int(torch.randint(w - cw + 1, (), generator=generator))
        image, target = crop(image, target, top, left, ch, cw)
    info = {"flipped": flipped, "img_size": tuple(image.shape[-2:])}
    return image, target, info


def eval_transform(
    image: torch.Tensor, target: dict[str, Any], cfg: TransformConfig
) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """Resize the image only, normalise; the target stays at the original size ``meta["orig_size"]``.

    Evaluation scores there, as the official tools do: ``knet.evaluation.process_at_original_size``
    maps each prediction back with ``Prediction.resized``. The model needs no targets at test time.
    """
    h, w = image.shape[-2:]
    image = resize_image(image, scaled_size(h, w, cfg.test_short_side, cfg.test_max_size))
    info = {"flipped": False, "img_size": tuple(image.shape[-2:])}
    return normalize(image, cfg.mean, cfg.std), target, info


# ``knet.bundle`` imports the test-time transform under this name; ``__test__`` keeps pytest from
# collecting it as a test wherever it is imported.
test_transform = eval_transform
test_transform.__test__ = False  # type: ignore[attr-defined]
