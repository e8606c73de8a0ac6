"""SecMI (Duan et al., ICML 2023): the t-error of a deterministic DDIM step pair, on any generator.

``z_0`` is inverted deterministically (DDIM, eta = 0) in steps of ``k`` up to ``t_sec``, giving ``z~_t``; one more
inversion step takes it to ``t_sec + k`` and one denoising step brings it back to ``t_sec``. The *t-error* is the
difference between the round trip and ``z~_t``: the model reproduces its own training points' trajectories
better, so members have small t-errors. Queries per image: ``t_sec / k + 2`` (12 at the defaults).

* ``secmi-stat``: minus the mean squared t-error (the paper's threshold attack).
* ``secmi-nn``: a small convolutional classifier on the t-error maps ``|error|``, trained on a split of the
  candidates the evaluation never sees (the paper trains a ResNet-18 on part of the members and non-members;
  a two-layer CNN fits the 8x8 digits and the latents of small pipelines).

Defaults (the paper's for DDPM on CIFAR-10): ``t_sec = 100``, interval ``k = 10`` (of 1000 steps).
"""

from __future__ import annotations

import numpy as np
import torch

from diffaudit.attacks import mia
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import Generator

SECMI_STAT = "secmi-stat"
SECMI_NN = "secmi-nn"
SECMI_T = 100
SECMI_K = 10
#: Classifier training: full-batch Adam; the number of epochs is chosen on the training split by 4-fold cross-
#: validation among NN_EPOCHS (a few hundred maps overfit a CNN quickly: 300 fixed epochs gave chance on held-out
#: candidates in our digits runs while reaching training AUC 0.99).
NN_EPOCHS = (25, 50, 100, 200, 400)
NN_FOLDS = 4
NN_LR = 1e-2
NN_WEIGHT_DECAY = 1e-4
NN_WIDTH = 16


def secmi_queries(t_sec: int = SECMI_T, k: int = SECMI_K) -> int:
    """Network queries per image: ``t_sec / k`` inversion steps to ``t_sec``, then one step up and one down."""
    return t_sec // k + 2


def t_errors(
    generator: Generator, data: ImageSet, t_sec: int = SECMI_T, k: int = SECMI_K, batch_size: int = 64
) -> np.ndarray:
    """SecMI's t-error maps ``float32 (N, *latent_shape)``: round trip ``t_sec -> t_sec + k -> t_sec`` minus
    the deterministic inversion ``z~_{t_sec}`` of the image."""
    if k < 1 or t_sec < k or t_sec % k or t_sec + k >= generator.num_train_timesteps:
        raise ConfigError(
            f"SecMI needs 1 <= k <= t_sec, t_sec a multiple of k and t_sec + k < {generator.num_train_timesteps};"
            f" got t_sec={t_sec}, k={k}"
        )
    gen, labels = mia.query_inputs(generator, data)
    z = gen.encode_images(data.images, batch_size)
    for t in range(0, t_sec, k):
        z = gen.ddim_step(z, t, t + k, labels, batch_size)
    up = gen.ddim_step(z, t_sec, t_sec + k, labels, batch_size)
    back = gen.ddim_step(up, t_sec + k, t_sec, labels, batch_size)
    return (back - z).float().cpu().numpy()


def stat_scores(errors: np.ndarray) -> np.ndarray:
    """``secmi-stat`` scores ``float64 (N,)``: minus the mean squared t-error per image."""
    return -np.square(errors.astype(np.float64)).reshape(len(errors), -1).mean(1)


def _check_training(train: np.ndarray, members: np.ndarray) -> None:
    if not members[train].any() or members[train].all():
        raise DataError("the attack classifier's training split needs both members and non-members")


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(scores)) + 1.0
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)) if n1 and n0 else 0.5


def _fit(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, seed: int, checkpoints: tuple[int, ...], score_rows):
    """Train the CNN on ``rows``; at each epoch count in ``checkpoints`` yield the logits of ``score_rows``."""
    gen = torch.Generator().manual_seed(int(seed))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(x.shape[1], NN_WIDTH, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(NN_WIDTH, NN_WIDTH, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(NN_WIDTH, 1),
    )
    with torch.no_grad():
        for param in net.parameters():  # seeded initialisation, independent of the global RNG
            param.copy_(torch.randn(param.shape, generator=gen) * (0.1 if param.ndim > 1 else 0.0))
    idx = torch.from_numpy(rows)
    pos = float(y[idx].sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(idx) - pos) / max(pos, 1.0)))
    opt = torch.optim.Adam(net.parameters(), lr=NN_LR, weight_decay=NN_WEIGHT_DECAY)
    out = {}
    for epoch in range(1, max(checkpoints) + 1):
        with torch.enable_grad():
            opt.zero_grad()
            loss_fn(net(x[idx]).squeeze(1), y[idx]).backward()
            opt.step()
        if epoch in checkpoints:
            with torch.no_grad():
                out[epoch] = net(x[torch.from_numpy(score_rows)]).squeeze(1).double().numpy()
    return out


def nn_scores(errors: np.ndarray, train: np.ndarray, members: np.ndarray, seed: int = 0) -> np.ndarray:
    """``secmi-nn`` scores ``float64 (N,)``: logits of a small CNN trained on the rows ``train`` (bool (N,)).

    Input: ``|t-error|`` maps ``(C, H, W)`` divided by their mean over the training rows. Classes are balanced
    by weighting the positive class; the number of epochs is chosen by cross-validation inside ``train``
    (:data:`NN_EPOCHS`). Deterministic for a seed (CPU, full batch).
    """
    train, members = np.asarray(train, bool), np.asarray(members, bool)
    _check_training(train, members)
    x = torch.from_numpy(np.abs(errors).astype(np.float32))
    if x.ndim == 2:  # flat latents: one row of "pixels"
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    x = x / x[torch.from_numpy(train)].mean().clamp_min(1e-12)
    y = torch.from_numpy(members.astype(np.float32))
    rows = np.flatnonzero(train)
    fold = np.random.default_rng([seed, 23]).permutation(len(rows)) % NN_FOLDS
    auc = {e: 0.0 for e in NN_EPOCHS}
    for f in range(NN_FOLDS):
        held = rows[fold == f]
        for epoch, s in _fit(x, y, rows[fold != f], seed + f + 1, NN_EPOCHS, held).items():
            auc[epoch] += _auc(s, members[held]) / NN_FOLDS
    best = max(NN_EPOCHS, key=lambda e: (round(auc[e], 6), -e))  # ties: fewer epochs
    return _fit(x, y, rows, seed, (best,), np.arange(len(x)))[best]
