"""A spectral detector of generated images: fixed frequency features and a logistic regression.

Generators leave traces in the frequency domain (Durall et al. 2020, Frank et al. 2020: up-sampling and
denoising change the high-frequency power spectrum). :func:`spectral_features` turns each image into a short,
fixed vector that does not depend on the image size: the log power in radial frequency bands (edges in units of
the Nyquist frequency, so 8x8 and 512x512 images share them), statistics of the high-pass residual, and the
share of clipped pixels. :class:`SpectralDetector` standardises these features and fits an L2-regularised
logistic regression (scipy L-BFGS, deterministic) on real (0) vs generated (1) images; its score is the logit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.optimize import minimize

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import DataError

#: Radial frequency bands (fractions of the Nyquist frequency, the corner beyond 1 is the last band).
DEFAULT_BANDS = 8
#: L2 penalty of the logistic regression (on standardised features).
DEFAULT_L2 = 1e-2


def spectral_features(images: np.ndarray, bands: int = DEFAULT_BANDS) -> np.ndarray:
    """``float64`` ``(N, bands + 4)`` features of ``uint8`` ``(N, C, H, W)`` images.

    Per image (grey = channel mean, in [0, 1]): mean log power of the mean-removed 2D spectrum in ``bands``
    equal radial bands of normalised frequency ``r = |f| / f_nyquist`` (``r > 1``, the corners, joins the
    last band); the log standard deviation and log mean absolute value of the residual after a 3x3 box blur
    (sensor/denoiser noise); the log standard deviation of the image; and the share of pixels at 0 or 255.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images must be uint8 (N, C, H, W); got {getattr(images, 'dtype', None)}")
    n, _, h, w = images.shape
    if h < 4 or w < 4:
        raise DataError(f"spectral features need images of at least 4x4 pixels; got {h}x{w}")
    grey = images.astype(np.float64).mean(axis=1) / 255.0  # (N, H, W)
    centred = grey - grey.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(centred)) ** 2 / (h * w)
    fy = np.fft.fftfreq(h)[:, None] / 0.5
    fx = np.fft.fftfreq(w)[None, :] / 0.5
    radius = np.sqrt(fy**2 + fx**2)
    band = np.minimum((radius * bands).astype(int), bands - 1)
    band[0, 0] = -1  # the DC term is 0 after centring
    log_power = np.log(power + 1e-10)
    feats = np.empty((n, bands + 4), dtype=np.float64)
    for b in range(bands):
        mask = band == b
        # Tiny images can leave a band empty (fewer frequencies than bands): its feature is a constant 0.
        feats[:, b] = log_power[:, mask].mean(axis=1) if mask.any() else 0.0
    residual = grey - uniform_filter(grey, size=(1, 3, 3), mode="reflect")
    feats[:, bands] = np.log(residual.reshape(n, -1).std(axis=1) + 1e-6)
    feats[:, bands + 1] = np.log(np.abs(residual).reshape(n, -1).mean(axis=1) + 1e-6)
    feats[:, bands + 2] = np.log(grey.reshape(n, -1).std(axis=1) + 1e-6)
    flat = images.reshape(n, -1)
    feats[:, bands + 3] = ((flat == 0) | (flat == 255)).mean(axis=1)
    return feats


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = DEFAULT_L2) -> tuple[np.ndarray, float]:
    """Weights ``(D,)`` and bias of an L2-regularised logistic regression on ``x`` ``(N, D)``, ``y`` in {0, 1}.

    Classes are weighted to equal total weight, so an unbalanced training set does not shift the logit.
    """
    y = np.asarray(y, dtype=np.float64)
    if not (y == 0).any() or not (y == 1).any():
        raise DataError("a detector needs real (0) and generated (1) training images")
    weight = np.where(y == 1, 0.5 / (y == 1).sum(), 0.5 / (y == 0).sum())

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        wts, bias = params[:-1], params[-1]
        z = x @ wts + bias
        # log(1 + e^z) - y z, computed stably; gradient (sigmoid(z) - y).
        nll = (weight * (np.logaddexp(0.0, z) - y * z)).sum() + 0.5 * l2 * (wts @ wts)
        g = weight * (1.0 / (1.0 + np.exp(-z)) - y)
        return float(nll), np.concatenate([x.T @ g + l2 * wts, [g.sum()]])

    res = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:-1].copy(), float(res.x[-1])


class SpectralDetector:
    """Fixed spectral features + logistic regression; ``score`` is the logit (higher = more likely generated)."""

    method: ClassVar[str] = "spectral"
    needs_training: ClassVar[bool] = True

    def __init__(self, bands: int = DEFAULT_BANDS, l2: float = DEFAULT_L2) -> None:
        self.bands = int(bands)
        self.l2 = float(l2)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.bias = 0.0

    def fit(self, real: ImageSet, generated: ImageSet, seed: int = 0) -> SpectralDetector:
        """Fit on real vs generated images (``seed`` unused: the fit is deterministic)."""
        x = spectral_features(np.concatenate([real.images, generated.images]), self.bands)
        y = np.concatenate([np.zeros(len(real)), np.ones(len(generated))])
        self.mean, self.std = x.mean(axis=0), x.std(axis=0) + 1e-8
        self.weights, self.bias = fit_logistic((x - self.mean) / self.std, y, self.l2)
        return self

    def score(self, images: ImageSet) -> np.ndarray:
        """``float64`` ``(N,)`` logits of ``images``."""
        if self.weights is None:
            raise DataError("the spectral detector is not fitted")
        x = spectral_features(images.images, self.bands)
        return (x - self.mean) / self.std @ self.weights + self.bias

    def state(self) -> dict[str, Any]:
        """JSON-ready parameters (what :meth:`from_state` reads)."""
        if self.weights is None:
            raise DataError("the spectral detector is not fitted")
        return {
            "bands": self.bands,
            "l2": self.l2,
            "mean": self.mean.tolist(),  # type: ignore[union-attr]
            "std": self.std.tolist(),  # type: ignore[union-attr]
            "weights": self.weights.tolist(),
            "bias": self.bias,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SpectralDetector:
        det = cls(state["bands"], state["l2"])
        det.mean, det.std = np.asarray(state["mean"]), np.asarray(state["std"])
        det.weights, det.bias = np.asarray(state["weights"]), float(state["bias"])
        if det.weights.shape != (det.bands + 4,):
            raise DataError(f"spectral detector weights of shape {det.weights.shape} do not match {det.bands} bands")
        return det

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "bands": self.bands, "l2": self.l2, "features": self.bands + 4}
