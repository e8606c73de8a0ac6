"""Detecting generated images that carry no tag: three detectors, each calibrated on real images.

* ``loss`` (:class:`LossDetector`): when the suspect generator is at hand, its own denoising loss
  (:meth:`diffaudit.generators.base.Generator.denoising_losses`, so it works on every family). A model fits its
  own samples better than fresh real images; the score is the negative mean loss over a few timesteps. Needs
  no training, only calibration.
* ``spectral`` (:class:`~diffaudit.detectors.spectral.SpectralDetector`): fixed frequency features + logistic
  regression, trained on real vs generated images.
* ``cnn`` (:class:`~diffaudit.detectors.cnn.CNNDetector`): a small seeded CNN, trained on the same.

Every detector is wrapped in a :class:`CalibratedDetector`: the threshold comes from held-out real images
(:func:`~diffaudit.detectors.calibration.calibrate_scores`, split-conformal) so the false-removal rate is known,
and the detector remembers the ids it was trained and calibrated on, so that :func:`evaluate_detector` refuses
to test it on them. On disk a detector is a directory: ``detector.json`` (+ ``detector.safetensors`` for the
CNN), no pickles.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.detectors.calibration import calibrate_scores, check_disjoint, roc_auc
from diffaudit.errors import ConfigError, DataError

METHODS = ("loss", "spectral", "cnn")
DETECTOR_JSON = "detector.json"
DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_FORMAT = 1
#: Timesteps of the loss detector, as fractions of the generator's training timesteps: small t, where a model's
#: fit to its own outputs differs most from its fit to fresh images (Carlini et al. use t near 100 of 1000).
DEFAULT_LOSS_FRACTIONS = (0.02, 0.05, 0.1)


def _noise_seed(image_id: str, draw: int, seed: int) -> int:
    """Noise seed of one image: a hash of its content id, so it never depends on the batch."""
    digest = hashlib.sha256(f"{image_id}:{draw}:{seed}".encode()).hexdigest()
    return int(digest[:15], 16)


class LossDetector:
    """The suspect generator's own denoising loss; ``score = -mean loss`` (higher = more likely its output).

    Args:
        generator: any :class:`~diffaudit.generators.base.Generator`.
        fractions: timesteps as fractions of ``generator.num_train_timesteps``.
        draws: noise draws per image and timestep (averaged).
        seed: noise seed offset.

    Labels: images whose class names equal the generator's conditions are scored under their own label; any
    other image (a scraped one has none) under the null condition.
    """

    method = "loss"
    needs_training = False

    def __init__(
        self, generator: Any, fractions: Sequence[float] = DEFAULT_LOSS_FRACTIONS, draws: int = 1, seed: int = 0
    ) -> None:
        if generator is None:
            raise ConfigError("the loss detector needs the suspect generator: pass --model RUN_OR_DIR")
        if not fractions or not all(0.0 < f < 1.0 for f in fractions):
            raise ConfigError(f"loss timesteps must be fractions in (0, 1); got {list(fractions)}")
        if draws < 1:
            raise ConfigError(f"noise draws must be >= 1; got {draws}")
        self.generator = generator
        self.fractions = tuple(float(f) for f in fractions)
        self.draws, self.seed = int(draws), int(seed)
        total = int(generator.num_train_timesteps)
        self.timesteps = sorted({max(1, min(total - 1, round(f * total))) for f in self.fractions})

    def fit(self, real: ImageSet, generated: ImageSet, seed: int = 0) -> LossDetector:
        return self  # nothing to learn: the generator is the detector

    def score(self, images: ImageSet) -> np.ndarray:
        """``float64`` ``(N,)``: minus the mean denoising loss over the timesteps and draws."""
        gen = self.generator
        if tuple(images.shape) != tuple(gen.image_shape):
            raise DataError(
                f"images of shape {images.shape} do not match the generator's {tuple(gen.image_shape)}; the loss "
                "detector scores images at the generator's own size"
            )
        if images.class_names and tuple(images.class_names) == tuple(gen.conditions):
            labels = images.labels
        else:
            labels = np.full(len(images), -1, dtype=np.int64)
        total = np.zeros(len(images), dtype=np.float64)
        for draw in range(self.draws):
            seeds = [_noise_seed(str(i), draw, self.seed) for i in images.ids]
            losses = gen.denoising_losses(images.images, labels, self.timesteps, seeds)
            total += np.asarray(losses, dtype=np.float64).mean(axis=1)
        return -total / self.draws

    def state(self) -> dict[str, Any]:
        return {"fractions": list(self.fractions), "draws": self.draws, "seed": self.seed}

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, **self.state(), "timesteps": self.timesteps, "model": _model_desc(self)}


def _model_desc(det: LossDetector) -> str:
    return str(getattr(det.generator, "model_id", type(det.generator).__name__))


def make_detector(method: str, generator: Any = None, **params: Any) -> Any:
    """A fresh (untrained) detector by name; ``params`` go to its constructor."""
    if method == "loss":
        return LossDetector(generator, **params)
    if method == "spectral":
        from diffaudit.detectors.spectral import SpectralDetector

        return SpectralDetector(**params)
    if method == "cnn":
        from diffaudit.detectors.cnn import CNNDetector

        return CNNDetector(**params)
    raise ConfigError(f"unknown detection method {method!r}; choose one of {', '.join(METHODS)}")


@dataclass
class CalibratedDetector:
    """A detector with a threshold set on held-out real images: ``flag`` is ``score > threshold``.

    Attributes:
        detector: the scoring detector (``loss``, ``spectral`` or ``cnn``).
        threshold, target_fpr, achieved_fpr, num_calibration: the calibration (see :func:`calibrate_scores`).
        seen: ``{"training": ids, "calibration": ids}`` of images the detector has already seen.
    """

    detector: Any
    threshold: float
    target_fpr: float
    achieved_fpr: float
    num_calibration: int
    seen: dict[str, list[str]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.detector.method)

    def scores(self, images: ImageSet) -> np.ndarray:
        """``float64`` ``(N,)`` scores (higher = more likely generated)."""
        if len(images) == 0:
            return np.zeros(0)
        return np.asarray(self.detector.score(images), dtype=np.float64)

    def flag(self, images: ImageSet) -> np.ndarray:
        """``bool`` ``(N,)``: which images the detector calls generated at the calibrated threshold."""
        return self.scores(images) > self.threshold

    def describe(self) -> dict[str, Any]:
        return {
            **self.detector.describe(),
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "achieved_fpr_on_calibration": self.achieved_fpr,
            "num_calibration": self.num_calibration,
            "num_training": len(self.seen.get("training", [])),
        }


def fit_detector(
    method: str,
    calibration_real: ImageSet,
    real_train: ImageSet | None = None,
    generated_train: ImageSet | None = None,
    target_fpr: float = 0.01,
    seed: int = 0,
    generator: Any = None,
    **params: Any,
) -> CalibratedDetector:
    """Train (``spectral``, ``cnn``) and calibrate a detector.

    Args:
        method: ``loss``, ``spectral`` or ``cnn``.
        calibration_real: held-out real images that set the threshold; none of them may be a training image.
        real_train, generated_train: training images (real = 0, generated = 1); unused by ``loss``.
        target_fpr: false-removal rate the threshold is set for.
        seed: training seed.
        generator: the suspect generator (``loss`` only).
        params: detector hyper-parameters (see the detector classes).
    """
    if not 0.0 < target_fpr < 1.0:
        raise ConfigError(f"target false-removal rate must be in (0, 1); got {target_fpr!r}")
    det = make_detector(method, generator, **params)
    seen: dict[str, list[str]] = {}
    if det.needs_training:
        if real_train is None or generated_train is None or not len(real_train) or not len(generated_train):
            raise ConfigError(f"the {method} detector is trained: give real and generated training images")
        train_ids = [*map(str, real_train.ids), *map(str, generated_train.ids)]
        check_disjoint(calibration_real.ids, {"training": train_ids}, "calibration images")
        det.fit(real_train, generated_train, seed)
        seen["training"] = train_ids
    threshold, achieved = calibrate_scores(np.asarray(det.score(calibration_real)), target_fpr)
    seen["calibration"] = [str(i) for i in calibration_real.ids]
    return CalibratedDetector(det, threshold, float(target_fpr), achieved, len(calibration_real), seen)


def evaluate_detector(
    detector: CalibratedDetector,
    real_test: ImageSet,
    generated_tests: Mapping[str, ImageSet],
    perturbations: Sequence[Any] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """False-removal rate on real test images, and per generated set TPR at the threshold and AUC.

    Args:
        detector: a calibrated detector; none of the test images may be among its training or calibration ids.
        real_test: fresh real images.
        generated_tests: ``{name: generated images}`` (other seeds, architectures, samplers, data sets).
        perturbations: :class:`~diffaudit.guards.perturb.Perturbation` s applied to real and generated test
            images alike (JPEG, resize...), each reported as its own condition.

    Returns ``{"detector": ..., "conditions": {cond: {"fpr": .., "sets": {name: {"tpr", "auc", "num"}}}}}`` with
    ``cond`` = ``clean`` or a perturbation label.
    """
    for name, images in {"real": real_test, **generated_tests}.items():
        check_disjoint(images.ids, detector.seen, f"test images ({name})")
    conditions: dict[str, Any] = {}
    for pert in [None, *perturbations]:
        label = "clean" if pert is None else pert.label

        def apply(s: ImageSet, p: Any = pert) -> ImageSet:
            return s if p is None else ImageSet(p(s.images, seed), s.labels, s.class_names)

        real_scores = detector.scores(apply(real_test))
        sets = {}
        for name, images in generated_tests.items():
            gen_scores = detector.scores(apply(images))
            sets[name] = {
                "num": len(images),
                "tpr": float((gen_scores > detector.threshold).mean()),
                "auc": roc_auc(real_scores, gen_scores),
            }
        conditions[label] = {
            "num_real": len(real_test),
            "fpr": float((real_scores > detector.threshold).mean()),
            "sets": sets,
        }
    return {"detector": detector.describe(), "conditions": conditions}


def detect_report(detector: CalibratedDetector, images: ImageSet) -> dict[str, Any]:
    """Per-image scores and flags, with counts; JSON-ready."""
    scores = detector.scores(images)
    hits = scores > detector.threshold
    return {
        "detector": detector.describe(),
        "threshold": detector.threshold,
        "num_images": len(images),
        "num_flagged": int(hits.sum()),
        "fraction_flagged": float(hits.mean()) if len(images) else 0.0,
        "per_image": [
            {"id": str(i), "score": float(s), "synthetic": bool(h)}
            for i, s, h in zip(images.ids, scores, hits, strict=True)
        ],
    }


# ---- save / load --------------------------------------------------------------------------------------------
def save_detector(detector: CalibratedDetector, directory: str | Path, model: str | None = None) -> Path:
    """Write ``detector.json`` (and ``detector.safetensors`` for a CNN) into ``directory``."""
    from diffaudit.io import atomic_write_bytes, atomic_write_json

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    det = detector.detector
    meta = {
        "format": DETECTOR_FORMAT,
        "method": det.method,
        "state": det.state(),
        "model": model,
        "threshold": detector.threshold,
        "target_fpr": detector.target_fpr,
        "achieved_fpr": detector.achieved_fpr,
        "num_calibration": detector.num_calibration,
        "seen": detector.seen,
    }
    if det.method == "cnn":
        from safetensors.torch import save as save_tensors

        atomic_write_bytes(path / DETECTOR_WEIGHTS, save_tensors(det.tensors()))
    atomic_write_json(path / DETECTOR_JSON, meta)
    return path


def load_detector(directory: str | Path, generator: Any = None) -> CalibratedDetector:
    """Read a detector saved by :func:`save_detector`; a ``loss`` detector needs its ``generator`` again."""
    path = Path(directory)
    meta_path = path / DETECTOR_JSON
    if not meta_path.is_file():
        raise DataError(f"{path}: not a detector directory (no {DETECTOR_JSON})")
    try:
        meta = json.loads(meta_path.read_text())
        method, state = meta["method"], meta["state"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path}: unreadable detector ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != DETECTOR_FORMAT:
        raise DataError(f"{meta_path}: unsupported detector format {meta.get('format')!r}")
    if method == "spectral":
        from diffaudit.detectors.spectral import SpectralDetector

        det: Any = SpectralDetector.from_state(state)
    elif method == "cnn":
        from safetensors.torch import load_file

        from diffaudit.detectors.cnn import CNNDetector

        weights = path / DETECTOR_WEIGHTS
        if not weights.is_file():
            raise DataError(f"{path}: CNN detector without {DETECTOR_WEIGHTS}")
        det = CNNDetector.from_state(state, load_file(str(weights)))
    elif method == "loss":
        det = LossDetector(generator, **state)
    else:
        raise DataError(f"{meta_path}: unknown detection method {method!r}")
    return CalibratedDetector(
        det,
        float(meta["threshold"]),
        float(meta["target_fpr"]),
        float(meta["achieved_fpr"]),
        int(meta["num_calibration"]),
        {k: list(v) for k, v in meta.get("seen", {}).items()},
    )
