import os

import numpy as np
import pytest
from PIL import Image

from diffaudit.data.canaries import plant_canaries
from diffaudit.data.sources import SourceOptions, load_source, load_source_with_info
from diffaudit.errors import DataError


def test_builtin_sources_shapes():
    digits = load_source("digits")
    assert digits.images.shape == (1797, 1, 8, 8) and digits.num_classes == 10 and digits.images.max() == 255
    faces = load_source("faces")
    assert faces.images.shape == (100, 1, 25, 25)
    glyphs = load_source("glyphs", subset=50, seed=1)
    assert glyphs.images.shape == (50, 1, 32, 32) and glyphs.num_classes == 10
    assert (glyphs.images.reshape(50, -1).max(1) > 0).all(), "a glyph rendered blank"


def test_options_resize_channels_classes_subset():
    data = load_source("digits", resolution=16, channels=3, classes=("3", "7"), subset=20, seed=0)
    assert data.images.shape == (20, 3, 16, 16)
    assert data.class_names == ("3", "7") and set(data.labels.tolist()) <= {0, 1}
    again = load_source("digits", resolution=16, channels=3, classes=("3", "7"), subset=20, seed=0)
    np.testing.assert_array_equal(data.ids, again.ids)


def test_unknown_source_and_class():
    with pytest.raises(DataError, match="unknown image source"):
        load_source("cifar")
    with pytest.raises(DataError, match="no classes"):
        load_source("digits", classes=("x",))


def _write_pngs(folder, n=3, size=(8, 8), mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = size[::-1] + ((3,) if mode == "RGB" else ())
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_folder_with_classes(tmp_path):
    _write_pngs(tmp_path / "cat", 2)
    _write_pngs(tmp_path / "dog", 3)
    data = load_source(f"folder:{tmp_path}")
    assert len(data) == 5 and data.class_names == ("cat", "dog")
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1, 1]


def test_folder_empty(tmp_path):
    with pytest.raises(DataError, match="no PNG or JPEG"):
        load_source(f"folder:{tmp_path}")


def test_folder_truncated_file_named_or_skipped(tmp_path):
    _write_pngs(tmp_path, 3)
    raw = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="1.png"):
        load_source(f"folder:{tmp_path}")
    data, info = load_source_with_info(f"folder:{tmp_path}", SourceOptions(skip_bad=True))
    assert len(data) == 2 and info["skipped"] == 1


def test_folder_unreadable_file(tmp_path):
    _write_pngs(tmp_path, 2)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.jpg"):
        load_source(f"folder:{tmp_path}")


def test_folder_decompression_bomb(tmp_path):
    _write_pngs(tmp_path, 1)
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match="big.png"):
        load_source(f"folder:{tmp_path}", max_pixels=200 * 200)


def test_folder_symlink_leaving_folder(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    _write_pngs(inside, 1)
    _write_pngs(outside, 1)
    os.symlink(outside / "0.png", inside / "escape.png")
    with pytest.raises(DataError, match="escape.png.*leaves"):
        load_source(f"folder:{inside}")


def test_folder_mixed_sizes_and_modes(tmp_path):
    _write_pngs(tmp_path, 2, size=(8, 8))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "z.png")
    with pytest.raises(DataError, match="z.png.*differs"):
        load_source(f"folder:{tmp_path}")
    assert load_source(f"folder:{tmp_path}", resolution=8).images.shape == (3, 1, 8, 8)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "zz.png")
    with pytest.raises(DataError, match="zz.png"):
        load_source(f"folder:{tmp_path}", resolution=8)
    assert load_source(f"folder:{tmp_path}", resolution=8, channels=3).images.shape == (4, 3, 8, 8)


def test_npz_source(tmp_path):
    load_source("faces").save(tmp_path / "f.npz")
    assert len(load_source(f"npz:{tmp_path / 'f.npz'}")) == 100


def test_canaries_exact_counts():
    data = load_source("digits", subset=200)
    planted, table = plant_canaries(data, [1, 2, 4, 8], per_count=2, seed=3)
    assert len(planted) == 200 + 2 * (0 + 1 + 3 + 7)
    ids, counts = np.unique(planted.ids, return_counts=True)
    lookup = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    for row in table:
        assert lookup[row["id"]] == row["copies"]
    with pytest.raises(DataError):
        plant_canaries(data, [0])
