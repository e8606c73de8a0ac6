"""GSA: gradient-based membership inference (Pang et al. 2023, "White-box membership inference attacks against
diffusion models"), on any white-box generator.

Features: for each candidate, the per-parameter-tensor L2 norms of the gradient of its training loss averaged over
``K`` timesteps evenly spaced over the chain (the paper's GSA_1: gradient of the mean loss over timesteps;
:meth:`~diffaudit.generators.queries.DenoisingQueries.loss_gradient_norms`), with noise seeded per image as for
the loss attack. A member sits near a minimum of its loss, so its gradients are small. A classifier on the log
norms (standardised) is trained on a split of the candidates the evaluation never sees. Queries per image: ``K``
forward passes and one backward pass.

Choices: ``K = 10`` timesteps ``0, T/10, ..., 9T/10`` (the paper samples timesteps evenly across the chain; the
exact K is from memory), logistic regression with its regularisation chosen by 4-fold cross-validation inside
the training split (:data:`GSA_CS`) instead of the paper's XGBoost: with a few hundred training candidates and
~100 features a regularised linear model is the stabler choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffaudit.attacks import mia
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import Generator

GSA = "gsa"
GSA_NUM_TIMESTEPS = 10
#: Draw index of GSA's query noise (distinct from the loss attack's draws 0..V-1 only by purpose; any fixed one).
GSA_DRAW = 0
#: Inverse regularisation strengths tried by cross-validation on the training split.
GSA_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def gsa_timesteps(num_train_timesteps: int, k: int = GSA_NUM_TIMESTEPS) -> tuple[int, ...]:
    """``k`` timesteps evenly spaced over ``[0, T)``: ``0, T/k, ..., (k-1) T/k``."""
    if not 1 <= k <= num_train_timesteps:
        raise ConfigError(f"GSA needs 1 <= timesteps <= {num_train_timesteps}, got {k}")
    return tuple(int(i * num_train_timesteps // k) for i in range(k))


def gsa_features(generator: Generator, data: ImageSet, timesteps: Sequence[int], seed: int = 0) -> np.ndarray:
    """Per-image gradient norms ``float32 (N, P)`` (P parameter tensors of the network); white box only."""
    gen, labels = mia.query_inputs(generator, data)
    if not hasattr(gen, "loss_gradient_norms"):
        raise ConfigError(f"{type(gen).__name__} is not white-box: GSA needs per-sample gradients")
    seeds = mia.noise_seeds(data.ids.tolist(), GSA_DRAW, seed)
    return gen.loss_gradient_norms(data.images, labels, timesteps, seeds)


def classifier_scores(features: np.ndarray, train: np.ndarray, members: np.ndarray, seed: int = 0) -> np.ndarray:
    """Decision values ``float64 (N,)`` of a logistic regression on ``log`` features, fitted on rows ``train``."""
    from sklearn.linear_model import LogisticRegression

    train, members = np.asarray(train, bool), np.asarray(members, bool)
    if not members[train].any() or members[train].all():
        raise DataError("the attack classifier's training split needs both members and non-members")
    x = np.log(np.maximum(features.astype(np.float64), 1e-30))
    mu, sd = x[train].mean(0), x[train].std(0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    # The regularisation is chosen by 4-fold cross-validation (AUC) inside the training split: ~100 features on
    # a few hundred candidates overfit at scikit-learn's default C = 1.
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    rows, y = np.flatnonzero(train), members[train]
    splits = min(4, int(y.sum()), int((~y).sum()))
    # Too few of a class to cross-validate (a tiny selection split): scikit-learn's default C = 1.
    cv_auc = {c: float(c == 1.0) for c in GSA_CS} if splits < 2 else {}
    folds = StratifiedKFold(n_splits=max(splits, 2), shuffle=True, random_state=seed)
    for c in GSA_CS if splits >= 2 else ():
        aucs = []
        for fit_rows, held in folds.split(rows, y):
            if y[held].all() or not y[held].any():
                continue
            m = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x[rows[fit_rows]], y[fit_rows])
            aucs.append(roc_auc_score(y[held], m.decision_function(x[rows[held]])))
        cv_auc[c] = float(np.mean(aucs)) if aucs else 0.5
    best = max(GSA_CS, key=lambda c: (round(cv_auc[c], 6), -c))  # ties: the stronger regularisation
    clf = LogisticRegression(C=best, max_iter=2000, class_weight="balanced").fit(x[train], members[train])
    return clf.decision_function(x).astype(np.float64)
