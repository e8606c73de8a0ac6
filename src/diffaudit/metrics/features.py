"""Feature extractors for the distribution metrics, behind a registry with validated names.

Every extractor maps ``uint8`` images ``(N, C, H, W)`` to ``float32`` features ``(N, D)``, in batches,
deterministically (the same images give the same features whatever the batch size, up to float rounding),
and describes itself with :meth:`FeatureExtractor.describe` so that results record which features they used.

Extractors are built from the **reference** (real) set: it fixes the input shape, and the ``classifier``
extractor trains on it. Registered names (see :func:`available_extractors`):

* ``classifier`` -- a small CNN trained on the reference labels (an autoencoder when unlabelled); features are
  its penultimate layer. Cached on disk (see :mod:`diffaudit.metrics.classifier`).
* ``random-cnn`` -- the same CNN trunk at a seeded random initialisation: the standard sanity check.
* ``pixels`` -- flattened pixels in [0, 1].
* ``inception`` -- the FID Inception-v3 (2048-d pool3), only from a local safetensors file the user supplies
  (``weights=PATH``); nothing is downloaded and pickles are refused (diffaudit.metrics.inception, docs/metrics.md).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.metrics import classifier as clf

# Extractor names.
CLASSIFIER = "classifier"
RANDOM_CNN = "random-cnn"
PIXELS = "pixels"
INCEPTION = "inception"

# Keys of describe(): every extractor reports these (None where they do not apply).
KEY_NAME = "name"
KEY_DIM = "dim"
KEY_INPUT_SHAPE = "input_shape"
KEY_SEED = "seed"
KEY_MODE = "mode"
KEY_ACCURACY = "heldout_accuracy"
KEY_RECON_MSE = "heldout_recon_mse"
KEY_CACHE_KEY = "cache_key"
KEY_CACHE_HIT = "cache_hit"
KEY_TRAIN_SECONDS = "train_seconds"
KEY_CONFIG = "config"
DESCRIBE_KEYS = (
    KEY_NAME,
    KEY_DIM,
    KEY_INPUT_SHAPE,
    KEY_SEED,
    KEY_MODE,
    KEY_ACCURACY,
    KEY_RECON_MSE,
    KEY_CACHE_KEY,
    KEY_CACHE_HIT,
    KEY_TRAIN_SECONDS,
    KEY_CONFIG,
)

DEFAULT_BATCH_SIZE = 512


def _as_images(images: np.ndarray | ImageSet) -> np.ndarray:
    if isinstance(images, ImageSet):
        return images.images
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
            "feature extractors take uint8 images (N, C, H, W); got "
            f"{getattr(images, 'dtype', type(images))} with shape {getattr(images, 'shape', None)}"
        )
    return images


class FeatureExtractor:
    """Base class: ``extractor(images)`` -> ``float32 (N, dim)``; subclasses implement :meth:`_extract`."""

    name = ""

    def __init__(self, input_shape: tuple[int, int, int], dim: int, seed: int | None = None) -> None:
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dim = int(dim)
        self.seed = seed

    def __call__(self, images: np.ndarray | ImageSet, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Features of ``images`` (``uint8 (N, C, H, W)`` or an ImageSet): ``float32 (N, dim)``.

        Raises:
            DataError: when the images are not uint8 NCHW or their ``(C, H, W)`` differs from the reference's.
            ConfigError: when ``batch_size`` is not positive.
        """
        images = _as_images(images)
        if tuple(images.shape[1:]) != self.input_shape:
            raise DataError(
                f"images of shape {tuple(images.shape[1:])} (C, H, W) do not match the {self.name!r} "
                f"extractor built for {self.input_shape}; resample them to the reference's resolution "
                "and channels first"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        out = np.empty((images.shape[0], self.dim), dtype=np.float32)
        for start in range(0, images.shape[0], batch_size):
            out[start : start + batch_size] = self._extract(images[start : start + batch_size])
        return out

    def _extract(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What made these features: name, dim, input shape, seed; for trained nets accuracy and cache key."""
        record: dict[str, Any] = dict.fromkeys(DESCRIBE_KEYS)
        record.update(
            {
                KEY_NAME: self.name,
                KEY_DIM: self.dim,
                KEY_INPUT_SHAPE: list(self.input_shape),
                KEY_SEED: self.seed,
            }
        )
        return record


class _TorchExtractor(FeatureExtractor):
    """Runs a torch module's ``features`` (or ``forward``) in eval mode, without gradients."""

    def __init__(
        self, module: torch.nn.Module, input_shape: tuple[int, int, int], dim: int, seed: int, device: str
    ) -> None:
        super().__init__(input_shape, dim, seed)
        self.module = module.eval().to(device)
        self.device = device

    def _extract(self, batch: np.ndarray) -> np.ndarray:
        fn = getattr(self.module, "features", self.module)
        with torch.no_grad():
            return fn(clf.to_input(batch).to(self.device)).float().cpu().numpy()


class PixelExtractor(FeatureExtractor):
    """Flattened pixels in [0, 1]: ``dim = C * H * W``."""

    name = PIXELS

    def _extract(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(batch.shape[0], -1).astype(np.float32) / 255.0


class RandomCNNExtractor(_TorchExtractor):
    """The classifier's conv trunk at a seeded random (Kaiming) initialisation, never trained."""

    name = RANDOM_CNN


class ClassifierExtractor(_TorchExtractor):
    """Penultimate-layer features of a CNN trained on the reference set (see :mod:`.classifier`)."""

    name = CLASSIFIER

    def __init__(
        self,
        net: clf.FeatureNet,
        input_shape: tuple[int, int, int],
        config: clf.TrainConfig,
        record: dict[str, Any],
        device: str,
    ) -> None:
        super().__init__(net, input_shape, config.feature_dim, config.seed, device)
        self.config = config
        self.record = record

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(
            {
                k: self.record.get(k)
                for k in (
                    KEY_MODE,
                    KEY_ACCURACY,
                    KEY_RECON_MSE,
                    KEY_CACHE_KEY,
                    KEY_CACHE_HIT,
                    KEY_TRAIN_SECONDS,
                )
            }
        )
        out[KEY_CONFIG] = self.record.get("config")
        for k in ("num_train", "num_holdout", "num_steps", "num_classes", "cache_path"):
            out[k] = self.record.get(k)
        return out


# ---- registry --------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


Factory = Callable[..., FeatureExtractor]


def register_extractor(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(reference: ImageSet, **options) -> FeatureExtractor`` under ``name``.

    The factory's keyword-only parameters are the options :func:`get_extractor` accepts for that name.
    """

    def deco(factory: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        if name in _REGISTRY:
            raise ValueError(f"feature extractor {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_extractors() -> list[str]:
    """Registered extractor names, sorted."""
    return sorted(_REGISTRY)


def extractor_options(name: str) -> dict[str, Any]:
    """Options accepted by extractor ``name`` with their defaults."""
    factory = _lookup(name)
    params = inspect.signature(factory).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _lookup(name: str) -> Callable[..., FeatureExtractor]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown feature extractor {name!r}; known: {', '.join(available_extractors())}")
    return _REGISTRY[name]


def get_extractor(name: str, reference: ImageSet, **options: Any) -> FeatureExtractor:
    """Build the extractor ``name`` for images shaped like ``reference`` (which it may train on).

    Args:
        name: one of :func:`available_extractors`.
        reference: the real set; fixes ``(C, H, W)`` and is the training data of ``classifier``.
        **options: extractor-specific settings (see :func:`extractor_options`), e.g. ``seed=0``.

    Raises:
        ConfigError: unknown name (the message lists the known ones) or an option that name does not take.
        DataError: a reference set the extractor cannot use (empty, too small, too few labels).
    """
    factory = _lookup(name)
    known = extractor_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"feature extractor {name!r} takes no option(s) {unknown}; it takes {sorted(known)}")
    if not isinstance(reference, ImageSet):
        raise DataError(f"the reference must be an ImageSet, got {type(reference).__name__}")
    if len(reference) == 0:
        raise DataError("the reference set is empty; feature extractors need its images")
    return factory(reference, **options)


@register_extractor(PIXELS)
def _make_pixels(reference: ImageSet) -> FeatureExtractor:
    c, h, w = reference.shape
    return PixelExtractor(reference.shape, c * h * w, None)


@register_extractor(RANDOM_CNN)
def _make_random_cnn(
    reference: ImageSet, *, seed: int = 0, feature_dim: int = 128, device: str = "cpu"
) -> FeatureExtractor:
    c, h, w = reference.shape
    clf.check_image_size(h, w)
    if not isinstance(feature_dim, int) or feature_dim < 1:
        raise ConfigError(f"random-cnn option feature_dim={feature_dim!r} must be a positive integer")
    trunk = clf.ConvTrunk(c, h, w, feature_dim)
    clf.init_weights(trunk, torch.Generator().manual_seed(int(seed)))
    return RandomCNNExtractor(trunk, reference.shape, feature_dim, int(seed), device)


@register_extractor(CLASSIFIER)
def _make_classifier(
    reference: ImageSet,
    *,
    seed: int = 0,
    mode: str = "auto",
    feature_dim: int = clf.TrainConfig.feature_dim,
    epochs: int = clf.TrainConfig.epochs,
    max_steps: int = clf.TrainConfig.max_steps,
    batch_size: int = clf.TrainConfig.batch_size,
    lr: float = clf.TrainConfig.lr,
    holdout_fraction: float = clf.TrainConfig.holdout_fraction,
    cache_dir: str | None = None,
    use_cache: bool = True,
    device: str = "cpu",
) -> FeatureExtractor:
    config = clf.TrainConfig(
        mode=mode,
        feature_dim=feature_dim,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        holdout_fraction=holdout_fraction,
        seed=int(seed),
    )
    config.validate()
    c, h, w = reference.shape
    clf.check_image_size(h, w)
    key = clf.data_key(reference.images, reference.labels, reference.ids, config)
    directory = clf.entry_dir(clf.cache_root(cache_dir), key)

    def build(meta: dict[str, Any]) -> clf.FeatureNet:
        return clf.FeatureNet(c, h, w, config.feature_dim, int(meta["num_classes"]))

    loaded = clf.load_entry(directory, key, build) if use_cache else None
    if loaded is not None:
        net, meta = loaded
        record = {**meta, KEY_CACHE_HIT: True}
    else:
        start = time.perf_counter()
        net, record = clf.train_feature_net(reference.images, reference.labels, reference.ids, config, device)
        record.update(
            {
                "key": key,
                KEY_CACHE_KEY: key[:24],
                "config": asdict(config),
                KEY_TRAIN_SECONDS: round(time.perf_counter() - start, 3),
                "input_shape": list(reference.shape),
            }
        )
        if use_cache:
            clf.save_entry(directory, net, record)
        record[KEY_CACHE_HIT] = False
    record["cache_path"] = str(directory) if use_cache else None
    return ClassifierExtractor(net, reference.shape, config, record, device)


@register_extractor(INCEPTION)
def _make_inception(reference: ImageSet, *, weights: str | None = None, device: str = "cpu") -> FeatureExtractor:
    # Inception-v3 (FID variant) in plain torch, from a local safetensors file the user supplies: never
    # downloaded, never unpickled (.pth/.pt are refused). Without ``weights`` this is a ConfigError that says how
    # to make the file and points at the in-house extractors. See diffaudit.metrics.inception, docs/metrics.md.
    from diffaudit.metrics import inception

    return inception.make_inception_extractor(reference.shape, weights, device)
