"""Model bundle: a folder holding everything needed to predict with a trained K-Net, without Ray or MLflow.

Layout (docs/interfaces.md §2)::

    weights.pt          state dict (loaded with ``torch.load(weights_only=True)``)
    model_config.json   KNetConfig.to_dict()
    inference.json      {"categories": CategoryTable.to_dict(), "transforms": TransformConfig.to_dict(),
                         "reduce_zero_label": bool}

``reduce_zero_label`` records how the training labels were read (ADE20K: file value v is class id
v - 1, 0 unlabelled), so semantic predictions can be written back as the dataset's file values;
bundles written before it existed lack the key and load as ``False``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from knet.build import build_model
from knet.config import KNetConfig
from knet.data import CategoryTable, TransformConfig, collate_batch
from knet.data.transforms import normalize, scaled_size
from knet.errors import KnetInputError, KnetInputNotFoundError
from knet.safe_load import load_tensors
from knet.structures import Prediction

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "model_config.json"
INFERENCE_FILE = "inference.json"


def save_bundle(
    directory: str | Path,
    model: nn.Module,
    config: KNetConfig,
    categories: CategoryTable,
    transforms: TransformConfig,
    *,
    reduce_zero_label: bool = False,
) -> Path:
    """Write the three bundle files into ``directory`` (created if needed); returns it.

    ``reduce_zero_label``: the training data's ``DataSource.reduce_zero_label`` (semantic labels).
    """
    if (config.num_thing_classes, config.num_stuff_classes) != (
        categories.num_thing_classes,
        categories.num_stuff_classes,
    ):
        raise ValueError(
            f"model config has {config.num_thing_classes} thing / {config.num_stuff_classes} stuff classes "
            f"but the category table has {categories.num_thing_classes} / {categories.num_stuff_classes}: "
            "save the categories the model was trained with"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    inference = {
        "categories": categories.to_dict(),
        "transforms": transforms.to_dict(),
        "reduce_zero_label": bool(reduce_zero_label),
    }
    (directory / INFERENCE_FILE).write_text(json.dumps(inference, indent=2))
    return directory


@dataclass
class ModelBundle:
    """A loaded bundle: the model in eval mode plus what it needs to read images and name classes.

    ``reduce_zero_label``: semantic label files hold dataset id + 1 (0 = unlabelled), as in training.
    """

    model: nn.Module
    config: KNetConfig
    categories: CategoryTable
    transforms: TransformConfig
    batch_size: int = 2
    reduce_zero_label: bool = False

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """(h, w, 3) uint8 RGB arrays -> one Prediction per image at that image's original size."""
        predictions: list[Prediction] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(images), self.batch_size):
            samples = [
                self._prepare(image, start + i)
                for i, image in enumerate(images[start : start + self.batch_size])
            ]
            batch = collate_batch(samples)
            # at the original size, probabilities resized before the merge (the reference's rescale)
            originals = [meta["orig_size"] for meta in batch.metas]
            outputs = self.model(
                batch.images.to(device), image_sizes=batch.image_sizes, output_sizes=originals
            )
            predictions.extend(prediction_to_cpu(output) for output in outputs)
        return predictions

    def _prepare(self, image: np.ndarray, index: int) -> tuple[torch.Tensor, dict, dict]:
        if not (
            isinstance(image, np.ndarray)
            and image.ndim == 3
            and image.shape[2] == 3
            and image.dtype == np.uint8
        ):
            got = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", None)
            raise KnetInputError(f"image {index}: expected an (h, w, 3) uint8 RGB array, got {got}")
        h, w = image.shape[:2]
        tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)
        cfg = self.transforms  # the dataset's test-time transform: single-scale resize, normalise
        size = scaled_size(h, w, cfg.test_short_side, cfg.test_max_size)
        if size != (h, w):  # bilinear then back to uint8, as knet.data.transforms.resize does for images
            resized = F.interpolate(tensor[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            tensor = resized.round().clamp(0, 255).to(torch.uint8)
        return normalize(tensor, cfg.mean, cfg.std), {}, {"orig_size": (h, w), "image_id": index}


def load_bundle(directory: str | Path, *, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild the model from ``model_config.json`` and load ``weights.pt`` (weights only, strict)."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE, INFERENCE_FILE):
        if not (directory / name).is_file():
            raise KnetInputNotFoundError(f"{directory} is not a model bundle: {name} is missing")
    config = KNetConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    inference = json.loads((directory / INFERENCE_FILE).read_text())
    reduce_zero_label = inference.get("reduce_zero_label", False)  # absent in older bundles
    if not isinstance(reduce_zero_label, bool):
        raise KnetInputError(
            f"{directory / INFERENCE_FILE}: reduce_zero_label must be true or false, got {reduce_zero_label!r}"
        )
    model = build_model(config)
    state = load_tensors(
        directory / WEIGHTS_FILE,
        fix="a bundle's weights are tensors only: write the bundle with knet.bundle.save_bundle (knet run does).",
    )
    model.load_state_dict(state)
    model.to(device).eval()
    return ModelBundle(
        model=model,
        config=config,
        categories=CategoryTable.from_dict(inference["categories"]),
        transforms=TransformConfig.from_dict(inference["transforms"]),
        reduce_zero_label=reduce_zero_label,
    )


def prediction_to_cpu(prediction: Prediction) -> Prediction:
    """Move every tensor of a prediction to the CPU (predictions leave the bundle on the CPU)."""
    for part in (prediction.panoptic, prediction.instance, prediction.semantic):
        if part is None:
            continue
        for name, value in vars(part).items():
            if isinstance(value, torch.Tensor):
                setattr(part, name, value.cpu())
    return prediction
