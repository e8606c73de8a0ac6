"""diffaudit.safeload: pickles refused unopened, safetensors read with clear errors, hashes of files and tensors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from diffaudit.errors import CheckpointError
from diffaudit.safeload import (
    PICKLE_SUFFIXES,
    load_safetensors,
    refuse_pickle_file,
    refuse_pickle_only_folder,
    sha256_file,
    tensors_digest,
)


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES + (".PT",))
def test_pickles_refused_without_opening(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"  # does not even exist: refusal must not open it
    with pytest.raises(CheckpointError, match="never unpickles"):
        refuse_pickle_file(path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_safetensors(path)


def test_pickle_only_folder_refused_and_mixed_folder_accepted(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        refuse_pickle_only_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    refuse_pickle_only_folder(tmp_path)


def test_load_safetensors_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_safetensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors"):
        load_safetensors(bad)
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(3.0)}, str(good))
    assert torch.equal(load_safetensors(good)["a"], torch.arange(3.0))


def test_hashes(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 100)
    assert sha256_file(f) == hashlib.sha256(b"x" * 100).hexdigest()
    a, b = torch.zeros(2), torch.ones(3, dtype=torch.int64)
    assert tensors_digest({"a": a, "b": b}) == tensors_digest({"b": b, "a": a})
    assert tensors_digest({"a": a}) != tensors_digest({"a": a.double()})  # dtype counts
