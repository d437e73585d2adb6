"""Every trainable parameter takes part in every loss: on a batch with targets and on one whose images
have none, for each task and decode head. This is why the platform wraps K-Net in DDP with
``find_unused_parameters=False`` (no extra autograd traversal per step, no per-worker warning); a
variant that left a parameter out would make DDP fail on its second step, so it must fail here first."""

from __future__ import annotations

import pytest
import torch

from tests.knet.test_model import tiny_model
from tests.knet.test_semantic import semantic_model, semantic_targets
from tests.support.shapes import make_batch


def _without_gradient(model: torch.nn.Module, losses: dict[str, torch.Tensor]) -> list[str]:
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("task", ["panoptic", "instance"])
@pytest.mark.parametrize("empty", [False, True], ids=["with-targets", "no-targets"])
def test_every_mask_model_parameter_gets_a_gradient(task: str, empty: bool) -> None:
    model = tiny_model(task).train()
    data = make_batch(0, 2, 96, 128, empty_index=None, instance_only=task == "instance")
    if empty:
        data = make_batch(0, 1, 96, 128, empty_index=0, instance_only=task == "instance")
    assert _without_gradient(model, model(data.images, data.targets)) == []


@pytest.mark.parametrize("decode_head", ["uper", "fcn"])
@pytest.mark.parametrize("aux_head", [True, False])
@pytest.mark.parametrize("empty", [False, True], ids=["with-targets", "no-targets"])
def test_every_semantic_model_parameter_gets_a_gradient(
    decode_head: str, aux_head: bool, empty: bool
) -> None:
    model = semantic_model(decode_head, aux_head=aux_head).train()
    data = make_batch(0, 2, 96, 128)  # two images: the pooling module's BatchNorm needs more than one value
    targets = [semantic_targets(t) for t in data.targets]
    if empty:  # every pixel unlabelled
        targets = [{"labels": t["labels"][:0], "masks": t["masks"][:0]} for t in targets]
    assert _without_gradient(model, model(data.images, targets)) == []
