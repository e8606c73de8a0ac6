"""PIA: Proximal Initialization Attack (Kong et al., ICLR 2024), on any generator.

The model's own noise prediction at ``t = 0`` serves as the noise that "initialises" the forward process:
``eps0 = eps_theta(z_0, 0)``, ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps0``, and the score is the distance
``|| eps_theta(z_t, t) - eps0 ||_p`` (a member's trajectory is nearly deterministic, so the prediction at ``t``
stays close to the one at 0). Two queries per image. **PIAN** (the paper's normalised variant) rescales ``eps0``
per image so that its mean absolute value is the standard normal's ``sqrt(2 / pi)`` before using it as noise.

Defaults (the paper's for DDPM on CIFAR-10, from memory of the paper and its code; see docs/mia.md): ``t = 200``
of 1000 and the ``l_4`` distance (reported as the mean of ``|.|^4`` over the latent, a monotone transform of the
``l_4`` norm, so ROC numbers are identical). Higher score = more likely a member (minus the distance).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffaudit.attacks import mia
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.base import Generator

PIA = "pia"
PIAN = "pian"
#: Paper defaults: t = 200 of 1000 DDPM steps, l_4 distance.
PIA_T = 200
PIA_P = 4
#: Network queries per image of each variant (eps at 0 and at t; PIA and PIAN share the first).
QUERIES = 2


def normalise_noise(eps: torch.Tensor) -> torch.Tensor:
    """PIAN's rescaling: per image, ``eps * sqrt(2/pi) / mean|eps|`` (mean absolute value of N(0, 1))."""
    scale = eps.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *[1] * (eps.ndim - 1))
    return eps / scale * math.sqrt(2.0 / math.pi)


def pia_scores(
    generator: Generator, data: ImageSet, t: int = PIA_T, p: float = PIA_P, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """``{"pia": (N,), "pian": (N,)}`` float64 scores (minus the mean ``|eps_theta(z_t, t) - eps0|^p``)."""
    if not 0 < int(t) < generator.num_train_timesteps:
        raise ConfigError(f"PIA timestep {t} outside (0, {generator.num_train_timesteps})")
    if not p > 0:
        raise ConfigError(f"PIA distance exponent p must be > 0, got {p}")
    gen, labels = mia.query_inputs(generator, data)
    z0 = gen.encode_images(data.images, batch_size)
    eps0 = gen.predict_noise(z0, 0, labels, batch_size)
    ab = float(gen.alphas_cumprod()[int(t)])
    out = {}
    for name, eps in ((PIA, eps0), (PIAN, normalise_noise(eps0))):
        z_t = math.sqrt(ab) * z0 + math.sqrt(1.0 - ab) * eps
        pred = gen.predict_noise(z_t, int(t), labels, batch_size)
        out[name] = -(pred - eps).abs().pow(p).flatten(1).mean(1).double().cpu().numpy()
    return out
