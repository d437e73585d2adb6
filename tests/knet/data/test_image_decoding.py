"""``read_rgb`` is knet's one image decoder: 16-bit images read as the 8-bit image they show (not
PIL's all-white), through the readers, Parquet and ``check_dataset`` alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knet.data import DataError, DataSource, SyntheticDataset, check_dataset, pack_dataset
from knet.data.io import read_rgb
from knet.data.readers import open_reader


def _gray16(height: int = 6, width: int = 8) -> np.ndarray:
    """uint16 (h, w) ramp over the whole 16-bit range."""
    return np.linspace(0, 65535, height * width).astype(np.uint16).reshape(height, width)


def test_16_bit_grayscale_png_reads_as_its_high_byte_in_rgb(tmp_path: Path) -> None:
    values = _gray16()
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"  # what PIL gives a 16-bit PNG
    rgb = read_rgb(tmp_path / "gray16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (6, 8, 3)
    np.testing.assert_array_equal(rgb, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 2  # not all white


def test_16_bit_png_bytes_decode_like_the_file(tmp_path: Path) -> None:
    Image.fromarray(_gray16()).save(tmp_path / "gray16.png")
    np.testing.assert_array_equal(
        read_rgb((tmp_path / "gray16.png").read_bytes()), read_rgb(tmp_path / "gray16.png")
    )


def test_8_bit_rgb_and_grayscale_images_are_unchanged(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "gray.png"), np.repeat(rgb[..., :1], 3, axis=-1))


def test_32_bit_image_beyond_16_bits_is_refused_naming_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 1 << 20, dtype=np.int32)).save(tmp_path / "deep.tif")
    with pytest.raises(DataError, match=r"image .*deep\.tif has pixel values in \[1048576, 1048576\]"):
        read_rgb(tmp_path / "deep.tif")


def test_float_image_is_refused_naming_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"image .*float\.tif has float pixels"):
        read_rgb(tmp_path / "float.tif")


@pytest.fixture
def sixteen_bit(synthetic: SyntheticDataset, tmp_path: Path) -> tuple[SyntheticDataset, np.ndarray]:
    """A copy of the synthetic dataset whose train image 000001.png is saved as 16-bit grayscale."""
    shutil.copytree(synthetic.out_dir, tmp_path / "data")
    copy = SyntheticDataset(
        tmp_path / "data", synthetic.seed, synthetic.image_size, synthetic.num_train, synthetic.num_val
    )
    path = Path(copy.source("coco_instance", "train").images) / "000001.png"
    gray8 = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path)  # 8-bit v -> 16-bit 257 v, high byte v
    return copy, gray8


@pytest.mark.parametrize("fmt", ["coco_instance", "coco_panoptic", "semantic"])
def test_reader_decodes_a_16_bit_png_to_its_8_bit_values(sixteen_bit, fmt: str) -> None:
    copy, gray8 = sixteen_bit
    reader = open_reader(copy.source(fmt, "train"))
    index = next(k for k, r in enumerate(reader.records) if r.file_name == "000001.png")
    image, _, _ = reader.read(index)  # (3, h, w)
    for channel in image:
        np.testing.assert_array_equal(channel.numpy(), gray8)


def test_check_dataset_reads_a_16_bit_png_as_its_8_bit_values(sixteen_bit, monkeypatch) -> None:
    import knet.data.io as knet_io

    copy, gray8 = sixteen_bit
    decoded: dict[str, np.ndarray] = {}
    real_read_rgb = knet_io.read_rgb

    def spy(source, *, name=None):
        decoded[str(name)] = real_read_rgb(source, name=name)
        return decoded[str(name)]

    monkeypatch.setattr(knet_io, "read_rgb", spy)
    report = check_dataset(copy.source("coco_instance", "train"))
    assert report.ok, report.problems
    (image,) = [v for k, v in decoded.items() if k.endswith("000001.png")]
    np.testing.assert_array_equal(image[..., 0], gray8)


def test_packed_16_bit_png_reads_back_as_its_8_bit_values(sixteen_bit, tmp_path: Path) -> None:
    copy, gray8 = sixteen_bit
    pack_dataset(copy.source("coco_instance", "train"), str(tmp_path / "pq"))
    reader = open_reader(DataSource("parquet", shards=str(tmp_path / "pq")))
    index = next(k for k in range(len(reader)) if reader.read(k)[2]["file_name"] == "000001.png")
    np.testing.assert_array_equal(reader.read(index)[0][0].numpy(), gray8)
