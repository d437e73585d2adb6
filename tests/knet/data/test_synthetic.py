"""The synthetic generator: deterministic, all segment kinds present, real COCO files."""

from __future__ import annotations

import json

import torch

from knet.data import SyntheticDataset, render_scene, synthesize


def test_same_seed_gives_identical_scenes_and_other_seed_differs() -> None:
    a, b, c = render_scene(5, 1, (64, 64)), render_scene(5, 1, (64, 64)), render_scene(6, 1, (64, 64))
    assert torch.equal(a.image, b.image)
    assert [s.category_id for s in a.segments] == [s.category_id for s in b.segments]
    assert not torch.equal(a.image, c.image)


def test_segments_do_not_overlap_and_cover_every_pixel() -> None:
    for index in range(6):
        scene = render_scene(0, index, (48, 64))
        coverage = torch.stack([s.mask for s in scene.segments]).sum(0)  # (H, W) segments per pixel
        assert bool((coverage == 1).all())


def test_instance_json_holds_polygons_compressed_and_uncompressed_rle_and_crowds(tmp_path) -> None:
    data = synthesize(tmp_path, num_images=24, seed=1, image_size=(64, 64))
    kinds = set()
    crowds = 0
    for split in ("train", "val"):
        coco = json.loads((tmp_path / "coco_instance" / f"{split}.json").read_text())
        for ann in coco["annotations"]:
            seg = ann["segmentation"]
            kinds.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
            crowds += ann["iscrowd"]
    assert kinds == {"polygon", "str", "list"}
    assert crowds >= 1
    assert (data.num_train, data.num_val) == (18, 6)


def test_synthesize_reuses_an_identical_folder_and_rewrites_a_changed_one(tmp_path) -> None:
    synthesize(tmp_path, num_images=4, seed=0, image_size=(32, 32))
    image = tmp_path / "images" / "train" / "000001.png"
    stamp = image.stat().st_mtime_ns
    synthesize(tmp_path, num_images=4, seed=0, image_size=(32, 32))
    assert image.stat().st_mtime_ns == stamp
    synthesize(tmp_path, num_images=4, seed=1, image_size=(32, 32))
    assert image.stat().st_mtime_ns != stamp


def test_sources_point_at_existing_files(synthetic: SyntheticDataset) -> None:
    from pathlib import Path

    for fmt in ("coco_instance", "coco_panoptic", "semantic"):
        src = synthetic.source(fmt, "val")
        for field in ("images", "annotations", "masks"):
            value = getattr(src, field)
            assert value is None or Path(value).exists()
