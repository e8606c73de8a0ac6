import numpy as np
import pytest

from diffaudit.data.imageset import ImageSet, content_id
from diffaudit.errors import DataError


def test_npz_round_trip_keeps_everything(tmp_path, tiny_images):
    data = ImageSet(tiny_images, np.arange(12) % 3, ("a", "b", "c"), {"source": "x", "seed": np.arange(12)})
    data = data.with_provenance(synthetic=True, tag="ss")
    path = data.save(tmp_path / "set.npz")
    back = ImageSet.load(path)
    np.testing.assert_array_equal(back.images, data.images)
    np.testing.assert_array_equal(back.labels, data.labels)
    assert back.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(back.ids, data.ids)
    for key, column in data.provenance.items():
        np.testing.assert_array_equal(back.provenance[key], column)
    assert back.provenance["synthetic"].all() and back.provenance["seed"][5] == 5


def test_ids_are_content_hashes(tiny_images):
    data = ImageSet(np.concatenate([tiny_images, tiny_images[:1]]), np.zeros(13))
    assert data.ids[0] == data.ids[12] == content_id(tiny_images[0])
    assert len(set(data.ids.tolist())) == 12


def test_rejects_bad_arrays(tiny_images):
    with pytest.raises(DataError, match="uint8"):
        ImageSet(tiny_images.astype(np.float32), np.zeros(12))
    with pytest.raises(DataError, match="labels"):
        ImageSet(tiny_images, np.zeros(5))
    with pytest.raises(DataError, match="class name"):
        ImageSet(tiny_images, np.full(12, 3), ("a",))
    with pytest.raises(DataError, match="provenance"):
        ImageSet(tiny_images, np.zeros(12), provenance={"colour": "red"})


def test_load_refuses_pickled_object_arrays(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, images=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="pickled"):
        ImageSet.load(path)


def test_load_truncated_npz_names_the_file(tmp_path, tiny_images):
    path = ImageSet(tiny_images, np.zeros(12)).save(tmp_path / "ok.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="cut.npz"):
        ImageSet.load(cut)


def test_save_is_atomic_on_failure(tmp_path, tiny_images, monkeypatch):
    data = ImageSet(tiny_images, np.zeros(12))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError):
        data.save(tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == []


def test_model_tensor_round_trip(tiny_images):
    data = ImageSet(tiny_images, np.zeros(12))
    x = data.to_model_tensor()
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    back = ImageSet.from_model_tensor(x, data.labels)
    np.testing.assert_array_equal(back.images, tiny_images)
