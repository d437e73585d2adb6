"""K-Net learns: a small model overfits a few generated shape images (things + stuff) to a high PQ."""

from __future__ import annotations

import pytest
import torch

from knet import KNetConfig, build_model
from tests.support.shapes import NUM_STUFF_CLASSES, NUM_THING_CLASSES, make_batch, reference_pq

NUM_PROPOSALS = 8
NUM_IMAGES = 4
STEPS = 150


@pytest.mark.slow
def test_small_panoptic_model_drives_the_loss_down_5x_and_reaches_pq_0_8_on_its_training_images() -> None:
    torch.manual_seed(0)
    cfg = KNetConfig.for_task(
        "panoptic",
        num_thing_classes=NUM_THING_CLASSES,
        num_stuff_classes=NUM_STUFF_CLASSES,
        backbone={"name": "resnet18", "frozen_stages": -1, "norm_eval": False},  # random init: train BN
        channels=64,
        num_proposals=NUM_PROPOSALS,
        num_stages=2,
        update={"feedforward_channels": 128, "num_heads": 4},
    )
    model = build_model(cfg)
    data = make_batch(0, NUM_IMAGES, 128, 128, num_things=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    model.train()
    for step in range(STEPS):
        batch = [(2 * step) % NUM_IMAGES, (2 * step + 1) % NUM_IMAGES]
        losses = model(data.images[batch], [data.targets[i] for i in batch])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())

    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert first / last >= 5, f"loss went from {first:.3f} to {last:.3f}"

    model.eval()
    with torch.no_grad():
        predictions = model(data.images)
    pairs = []
    for prediction, target in zip(predictions, data.targets, strict=True):
        panoptic = prediction.panoptic
        predicted = [(int(label), panoptic.segment_map == i + 1) for i, label in enumerate(panoptic.labels)]
        truth = [(int(label), mask) for label, mask in zip(target["labels"], target["masks"], strict=True)]
        pairs.append((predicted, truth))
    pq = reference_pq(pairs, NUM_THING_CLASSES + NUM_STUFF_CLASSES)
    assert pq >= 0.8, f"PQ {pq:.3f} on the training images"
