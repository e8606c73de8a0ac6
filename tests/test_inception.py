"""Inception extractor: torchvision-named FID Inception-v3 loaded from safetensors; pickles and bad files refused.

The real weights are not available here, so a seeded random network stands in for them: the test checks the
architecture (parameter names, shapes, count), loading, preprocessing and the extractor contract, not the
values of real Inception features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import CheckpointError, ConfigError
from diffaudit.metrics import features as F
from diffaudit.metrics import inception as inc

# torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696) and fc (2,049,000).
TRUNK_PARAMETERS = 21_785_568


def _random_net(seed: int = 0) -> inc.FIDInceptionV3:
    gen = torch.Generator().manual_seed(seed)
    net = inc.FIDInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2, generator=gen)
                m.bias.normal_(0.0, 0.05, generator=gen)
                m.running_mean.normal_(0.0, 0.05, generator=gen)
                m.running_var.uniform_(0.8, 1.2, generator=gen)
    return net.eval()


def _file_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Like the converted FID file: with the 1008-way fc head, without BatchNorm's step counters."""
    state = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    return state


@pytest.fixture(scope="module")
def net() -> inc.FIDInceptionV3:
    return _random_net(0)


@pytest.fixture(scope="module")
def weights(net: inc.FIDInceptionV3, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("inception") / "fid_inception.safetensors"
    save_file(_file_state(net), str(path))
    return str(path)


def _grey() -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(rng.integers(0, 256, (2, 1, 8, 8), dtype=np.uint8), np.zeros(2, dtype=np.int64))


def _rgb() -> ImageSet:
    rng = np.random.default_rng(1)
    return ImageSet(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), np.zeros(2, dtype=np.int64))


def test_architecture_names_and_shapes(net: inc.FIDInceptionV3) -> None:
    assert sum(p.numel() for p in net.parameters()) == TRUNK_PARAMETERS
    state = net.state_dict()
    assert len([k for k in state if k.endswith(".conv.weight")]) == 94
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_mean": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.running_var": (192,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("fc.", "AuxLogits.")) for k in state)


def test_features_from_safetensors(net: inc.FIDInceptionV3, weights: str) -> None:
    grey, rgb = _grey(), _rgb()
    ex = F.get_extractor(F.INCEPTION, grey, weights=weights)
    a = ex(grey.images, batch_size=2)
    assert a.dtype == np.float32 and a.shape == (2, 2048)
    assert np.isfinite(a).all() and a.std() > 0 and not np.allclose(a[0], a[1])
    # The loaded file drives the features: the same as the in-memory net on the grey images repeated to RGB.
    with torch.no_grad():
        x = torch.from_numpy(grey.images).float().div(255.0).repeat(1, 3, 1, 1)
        direct = net.features(x).numpy()
    np.testing.assert_allclose(a, direct, rtol=1e-4, atol=1e-4 * float(np.abs(direct).max()))
    b = ex(grey.images, batch_size=1)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))

    ex_rgb = F.get_extractor(F.INCEPTION, rgb, weights=weights)
    c = ex_rgb(rgb)
    assert c.dtype == np.float32 and c.shape == (2, 2048)
    np.testing.assert_array_equal(c, ex_rgb(rgb))  # same call, same bits

    d = ex.describe()
    assert d[F.KEY_NAME] == F.INCEPTION and d[F.KEY_DIM] == 2048 and d["weights"] == weights
    assert len(d["weights_sha256"]) == 64 and "only if" in d["note"]
    assert set(F.DESCRIBE_KEYS) <= set(d)


def test_no_weights_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="weights=PATH.safetensors") as err:
        F.get_extractor(F.INCEPTION, _grey())
    assert "never downloads" in str(err.value) and F.CLASSIFIER in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        F.get_extractor(F.INCEPTION, _grey(), weights="/nonexistent/fid_inception.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".pkl"])
def test_pickles_refused_unopened(tmp_path, suffix: str) -> None:
    path = tmp_path / f"pt_inception{suffix}"
    path.write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="never unpickles"):
        F.get_extractor(F.INCEPTION, _grey(), weights=str(path))


def test_bad_files_refused(weights: str, tmp_path) -> None:
    state = load_file(weights)
    del state["Mixed_6c.branch7x7_2.bn.running_var"]
    state["AuxLogits.fc.weight"] = torch.zeros(2, 2)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        F.get_extractor(F.INCEPTION, _grey(), weights=str(path))
    message = str(err.value)
    assert "Mixed_6c.branch7x7_2.bn.running_var" in message and "AuxLogits.fc.weight" in message
    assert "missing 1 key" in message and "torchvision" in message

    state = load_file(weights)
    state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 1, 3, 3)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"Conv2d_1a_3x3.conv.weight \(32, 1, 3, 3\)"):
        F.get_extractor(F.INCEPTION, _grey(), weights=str(path))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        F.get_extractor(F.INCEPTION, _grey(), weights=str(garbage))
