"""The quickstart shrunk to seconds, as the platform benchmarks run it: ResNet-18 with 32 channels,
64-pixel images, no DataLoader processes, tracking under one scratch folder."""

from __future__ import annotations

from pathlib import Path

QUICKSTART = Path(__file__).absolute().parents[1] / "experiments" / "quickstart.yaml"
BATCH = 2  # per worker


def small_overrides(workdir: Path, *, epochs: int, steps: int, workers: int, log_every: int = 0) -> list[str]:
    """``--set`` strings for ``epochs`` epochs of ``steps`` steps of ``BATCH`` on ``workers`` workers."""
    return [
        "model.backbone.name=resnet18",
        "model.channels=32",
        "model.num_proposals=8",
        "model.num_stages=1",
        "data.transforms.train_short_sides=[64]",
        "data.transforms.max_size=64",
        "data.transforms.crop_size=null",
        "data.transforms.test_short_side=64",
        "data.transforms.test_max_size=64",
        "data.num_workers=0",
        f"train.epochs={epochs}",
        f"train.batch_size={BATCH}",
        f"train.max_steps_per_epoch={steps}",
        f"train.log_every={log_every}",
        f"scaling.num_workers={workers}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.artifact_location={workdir / 'mlartifacts'}",
        f"tracking.storage_path={workdir / 'ray_results'}",
    ]
