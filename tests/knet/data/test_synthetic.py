"""The synthetic generator: deterministic, all segment kinds present, real COCO files."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_sources_point_at_the_files_of_their_split(synthetic: SyntheticDataset) -> None:
    for split, count in (("train", 8), ("val", 2)):
        names = [f"{image_id:06d}.png" for image_id in synthetic.image_ids(split)]
        assert len(names) == count
        instance = synthetic.source("coco_instance", split)
        assert sorted(p.name for p in Path(instance.images).iterdir()) == names
        coco = json.loads(Path(instance.annotations).read_text())
        assert [(i["id"], i["file_name"]) for i in coco["images"]] == list(
            zip(synthetic.image_ids(split), names)
        )
        assert {a["image_id"] for a in coco["annotations"]} <= set(synthetic.image_ids(split))

        panoptic = synthetic.source("coco_panoptic", split)
        assert panoptic.images == instance.images
        pan = json.loads(Path(panoptic.annotations).read_text())
        assert [a["image_id"] for a in pan["annotations"]] == synthetic.image_ids(split)
        assert sorted(p.name for p in Path(panoptic.masks).iterdir()) == [
            a["file_name"] for a in pan["annotations"]
        ]

        semantic = synthetic.source("semantic", split)
        assert semantic.images == instance.images and semantic.reduce_zero_label
        assert sorted(p.name for p in Path(semantic.masks).iterdir()) == names
        categories = json.loads(Path(semantic.annotations).read_text())["categories"]
        assert [c["name"] for c in categories] == ["circle", "square", "triangle", "sky", "ground"]
