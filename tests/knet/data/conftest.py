from __future__ import annotations

import pytest

from knet.data import SyntheticDataset, synthesize


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """A small synthetic dataset (10 images, 8 train + 2 val), written once per session."""
    return synthesize(
        tmp_path_factory.mktemp("synthetic"), num_images=10, seed=3, image_size=(64, 80), val_fraction=0.2
    )
