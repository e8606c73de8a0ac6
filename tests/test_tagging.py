"""Tagging: detection at the calibrated FPR, known SD/SDXL watermarks, perturbations and input checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffaudit.errors import ConfigError, DataError
from diffaudit.guards.perturb import (
    PERTURBATIONS,
    Perturbation,
    crop,
    gaussian_noise,
    greyscale,
    parse_perturbation,
)
from diffaudit.guards.tagging import (
    KEY_CLEAN,
    KEY_FID_CHANGE,
    KEY_PERTURBED,
    KEY_PSNR_MEAN,
    KEY_TPR,
    SpreadSpectrumTagger,
    evaluate_tagger,
    get_tagger,
    psnr,
)
from diffaudit.guards.tags_dwt import DwtDctTagger, detect_known_tags, min_bit_accuracy


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)[:, None]


def _crops(size: int, num: int, seed: int, out_size: int) -> np.ndarray:
    import skimage.data

    pictures = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    rng = np.random.default_rng(seed)
    out = np.empty((num, 3, out_size, out_size), dtype=np.uint8)
    for i in range(num):
        pic = pictures[i % len(pictures)]
        top = int(rng.integers(0, pic.shape[0] - size + 1))
        left = int(rng.integers(0, pic.shape[1] - size + 1))
        part = Image.fromarray(pic[top : top + size, left : left + size]).resize((out_size, out_size))
        out[i] = np.asarray(part).transpose(2, 0, 1)
    return out


@pytest.fixture(scope="module")
def faces32() -> np.ndarray:
    return _crops(96, 400, seed=0, out_size=32)


@pytest.fixture(scope="module")
def astronaut256() -> np.ndarray:
    import skimage.data

    # dwtDct is not error-free on every image (clipping in the YUV round trip, ties in the block maximum:
    # docs/tagging.md): this crop is one it round-trips exactly, as the scheme intends.
    return skimage.data.astronaut()[256:, 256:].transpose(2, 0, 1)[None].copy()


# ---- spread spectrum ------------------------------------------------------------------------------------


def test_realised_fpr_matches_target_and_tagged_detected(digits: np.ndarray) -> None:
    tagger = SpreadSpectrumTagger(key=7, amplitude=48)
    order = np.random.default_rng(0).permutation(len(digits))
    calib, fresh = digits[order[:900]], digits[order[900:]]
    threshold = tagger.calibrate(calib, target_fpr=0.05)
    fpr = tagger.detect(fresh, threshold).mean()
    tpr = tagger.detect(tagger.embed(fresh), threshold).mean()
    # 897 fresh images: the binomial standard deviation of the FPR at 5% is 0.7%.
    assert 0.025 <= fpr <= 0.08, fpr
    assert tpr > 0.95, tpr


@pytest.mark.parametrize("size", ["8x8", "32x32"])
def test_spread_spectrum_high_tpr_clean(size: str, digits: np.ndarray, faces32: np.ndarray) -> None:
    images, amplitude = (digits, 48.0) if size == "8x8" else (faces32, SpreadSpectrumTagger.DEFAULT_AMPLITUDE)
    result = evaluate_tagger(SpreadSpectrumTagger(key=3, amplitude=amplitude), images, perturbations=())
    assert result[KEY_CLEAN][KEY_TPR] > 0.95
    assert result[KEY_CLEAN]["fpr"] <= 0.05
    assert result[KEY_FID_CHANGE] is None and result[KEY_PERTURBED] == {}
    if size == "32x32":  # barely any clipping on natural crops: PSNR is close to 20 log10(255 / amplitude)
        assert result[KEY_PSNR_MEAN] == pytest.approx(20 * np.log10(255 / amplitude), abs=0.5)


def test_wrong_key_not_detected(faces32: np.ndarray) -> None:
    right, wrong = SpreadSpectrumTagger(key=1), SpreadSpectrumTagger(key=2)
    calib, fresh = faces32[:200], faces32[200:]
    tagged = right.embed(fresh)
    assert right.detect(tagged, right.calibrate(calib)).mean() > 0.9
    assert wrong.detect(tagged, wrong.calibrate(calib)).mean() < 0.05


def test_spread_spectrum_pattern_per_size_and_survives_grey(faces32: np.ndarray) -> None:
    tagger = SpreadSpectrumTagger(key=5, amplitude=4)
    p8, p32 = tagger.pattern(8, 8), tagger.pattern(32, 32)
    assert p8.shape == (8, 8) and set(np.unique(p32)) == {-1.0, 1.0}
    np.testing.assert_array_equal(p32, SpreadSpectrumTagger(key=5).pattern(32, 32))  # the key reproduces it
    tagged = tagger.embed(faces32[:100])
    assert tagged.dtype == np.uint8 and tagged.shape == (100, 3, 32, 32)
    threshold = tagger.calibrate(faces32[100:])
    # One pattern in every channel: the tag is in luminance and survives grey conversion.
    assert tagger.detect(greyscale(tagged), threshold).mean() > 0.9


def test_evaluate_reports_every_perturbation(faces32: np.ndarray) -> None:
    perturbations = (Perturbation("jpeg", {"quality": 90}), Perturbation("resize", {"factor": 0.5}))
    result = evaluate_tagger(SpreadSpectrumTagger(key=1), faces32, perturbations=perturbations, seed=1)
    assert set(result[KEY_PERTURBED]) == {"jpeg_quality=90", "resize_factor=0.5"}
    # A +-1 pixel pattern is high-frequency: halving the resolution removes it, JPEG at q90 mostly keeps it.
    assert result[KEY_PERTURBED]["resize_factor=0.5"]["tpr"] < 0.2
    assert result[KEY_PERTURBED]["jpeg_quality=90"]["tpr_recalibrated"] > 0.5


def test_calibration_needs_enough_images(digits: np.ndarray) -> None:
    with pytest.raises(DataError, match="at least 100"):
        SpreadSpectrumTagger().calibrate(digits[:50], target_fpr=0.01)
    with pytest.raises(ConfigError, match="target_fpr"):
        SpreadSpectrumTagger().calibrate(digits, target_fpr=1.5)


# ---- invisible-watermark dwtDct -------------------------------------------------------------------------


def test_dwtdct_round_trip_sd_v1_and_sdxl(astronaut256: np.ndarray) -> None:
    from imwatermark import WatermarkDecoder

    sd = DwtDctTagger("sd-v1").embed(astronaut256)
    xl = DwtDctTagger("sdxl").embed(astronaut256)
    assert sd.dtype == np.uint8 and sd.shape == astronaut256.shape
    assert psnr(astronaut256, sd)[0] > 30
    # Decoded exactly as the Stable Diffusion scripts do: BGR H x W x C, 136 bits as bytes.
    bgr = np.ascontiguousarray(sd[0].transpose(1, 2, 0)[:, :, ::-1])
    assert WatermarkDecoder("bytes", 136).decode(bgr, "dwtDct") == b"StableDiffusionV1"
    bits = DwtDctTagger("sdxl").decode_bits(xl)[0]
    assert int("".join(str(int(b)) for b in bits), 2) == 0xB3EC907BB19E
    assert DwtDctTagger("sd-v1").score(sd)[0] == 1.0
    assert DwtDctTagger("sd-v1").score(astronaut256)[0] < 0.7
    assert DwtDctTagger("sdxl").score(astronaut256)[0] < 0.8
    # Grey conversion erases the chrominance tag.
    assert DwtDctTagger("sd-v1").score(greyscale(sd))[0] < 0.7


def test_detect_known_tags_array_and_folder(astronaut256: np.ndarray, tmp_path) -> None:
    sd = DwtDctTagger("sd-v1").embed(astronaut256)
    xl = DwtDctTagger("sdxl").embed(astronaut256)
    found = detect_known_tags(np.concatenate([sd, xl, astronaut256]))
    assert [m.tag for m in found] == ["sd-v1", "sdxl", ""]
    assert found[0].bit_accuracy["sd-v1"] == 1.0 and found[2].bit_accuracy["sdxl"] < 0.9

    Image.fromarray(sd[0].transpose(1, 2, 0)).save(tmp_path / "a_tagged.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "b_small.png")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "c_grey.png")
    (tmp_path / "d_notes.txt").write_text("not an image")
    rows = {m.source: m for m in detect_known_tags(tmp_path)}
    assert rows["a_tagged.png"].tag == "sd-v1"
    assert rows["b_small.png"].tag == "" and "64x64" in rows["b_small.png"].note
    assert "not colour" in rows["c_grey.png"].note and "readable" in rows["d_notes.txt"].note


def test_min_bit_accuracy_is_the_binomial_tail() -> None:
    from math import comb

    def tail(k: int, n: int) -> float:  # P(at least k of n fair bits match)
        return sum(comb(n, j) for j in range(k, n + 1)) / 2**n

    for n, fa in [(48, 1e-3), (136, 1e-6), (16, 0.05)]:
        k = round(min_bit_accuracy(n, fa) * n)
        assert tail(k, n) <= fa < tail(k - 1, n)
    assert min_bit_accuracy(136) == 96 / 136 and min_bit_accuracy(48) == 41 / 48


@pytest.mark.parametrize(
    "shape, match",
    [((2, 1, 256, 256), "1-channel"), ((2, 3, 128, 256), "128x256"), ((1, 3, 32, 32), "32x32")],
)
def test_dwtdct_rejects_grey_and_small(shape: tuple[int, ...], match: str) -> None:
    images = np.zeros(shape, np.uint8)
    with pytest.raises(ConfigError, match=match):
        DwtDctTagger().embed(images)
    with pytest.raises(ConfigError, match=match):
        DwtDctTagger().score(images)


def test_registry_and_parameter_validation() -> None:
    assert isinstance(get_tagger("spread-spectrum", key=3, amplitude=2), SpreadSpectrumTagger)
    assert get_tagger("dwtdct", preset="sdxl").params["preset"] == "sdxl"
    with pytest.raises(ConfigError, match=r"known: \['dwtdct', 'spread-spectrum'\]"):
        get_tagger("stegano")
    with pytest.raises(ConfigError, match="bad parameters"):
        get_tagger("spread-spectrum", strength=3)
    with pytest.raises(ConfigError, match="amplitude"):
        SpreadSpectrumTagger(amplitude=0)
    with pytest.raises(ConfigError, match="key"):
        SpreadSpectrumTagger(key=-1)
    with pytest.raises(ConfigError, match="preset"):
        DwtDctTagger("sd-v3")
    with pytest.raises(ConfigError, match="method"):
        DwtDctTagger("custom", message=b"hi", method="rivaGan")
    with pytest.raises(DataError, match="uint8"):
        SpreadSpectrumTagger().score(np.zeros((2, 1, 8, 8), np.float32))


# ---- perturbations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (3, 3, 32, 32), (2, 3, 25, 25)])
def test_perturbations_keep_dtype_and_shape(name: str, shape: tuple[int, ...]) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = PERTURBATIONS[name](images, seed=1)
    assert out.dtype == np.uint8 and out.shape == images.shape
    if name != "greyscale" or shape[1] == 3:
        assert not np.array_equal(out, images), name  # it really changed something


def test_perturbations_are_batch_independent_and_seeded() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(6, 3, 16, 16), dtype=np.uint8)
    for fn in (gaussian_noise, crop):
        full = fn(images, seed=4)
        np.testing.assert_array_equal(full[:3], fn(images[:3], seed=4))
        assert not np.array_equal(full, fn(images, seed=5))


def test_perturbation_specs() -> None:
    p = parse_perturbation("jpeg:quality=75")
    assert p == Perturbation("jpeg", {"quality": 75}) and p.label == "jpeg_quality=75"
    with pytest.raises(ConfigError, match="known"):
        parse_perturbation("blur:sigma=1")
    with pytest.raises(ConfigError, match="no parameter"):
        Perturbation("resize", {"scale": 0.5})
    with pytest.raises(ConfigError, match="quality"):
        parse_perturbation("jpeg:quality=0")(np.zeros((1, 1, 8, 8), np.uint8))
