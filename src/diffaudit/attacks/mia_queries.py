"""The attacks of the field beyond the loss, run on the target of a membership-inference run: PIA and PIAN
(:mod:`.pia`), SecMI statistical and neural (:mod:`.secmi`), GSA (:mod:`.gsa`).

None needs shadow models; each queries the target generator only. Threshold attacks (PIA, PIAN, SecMI-stat)
are scored as they are; the classifier attacks (SecMI-NN, GSA) train on the run's *selection* split (never part
of the reported numbers) and are reported, like every attack, on the evaluation split. Results follow the
layout of the loss and LiRA attacks (``t``, AUC, TPR at 1% / 0.1% FPR, counts, resolution); costs (network
queries and seconds per image) go to ``results["costs"]``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from diffaudit.attacks import gsa, pia, roc, secmi
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.base import Generator

#: Every attack of this module, in report order.
QUERY_ATTACKS = (pia.PIA, pia.PIAN, secmi.SECMI_STAT, secmi.SECMI_NN, gsa.GSA)


def check_attacks(names: tuple[str, ...]) -> None:
    bad = [n for n in names if n not in QUERY_ATTACKS]
    if bad:
        raise ConfigError(f"unknown attacks {bad}; known beyond loss/LiRA: {list(QUERY_ATTACKS)}")


def run_query_attacks(
    generator: Generator,
    pool: ImageSet,
    members: np.ndarray,
    selection: np.ndarray,
    names: tuple[str, ...],
    params: dict[str, int],
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, dict[str, Any]], dict[str, str]]:
    """Run ``names`` on ``generator`` over ``pool``; ``members``/``selection`` ``bool (N,)``.

    ``params``: ``pia_t``, ``secmi_t``, ``secmi_k``, ``gsa_timesteps`` (the count K). Returns per-attack results
    (evaluation split), scores ``{name: float64 (N,)}``, costs ``{name: {queries_per_image, seconds_per_image}}``
    and skipped attacks with the reason (GSA on a model without network parameters).
    """
    check_attacks(names)
    n = len(pool)
    evaluation = ~selection
    scores: dict[str, np.ndarray] = {}
    costs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    t_of: dict[str, Any] = {}
    if pia.PIA in names or pia.PIAN in names:
        t0 = time.perf_counter()
        out = pia.pia_scores(generator, pool, params["pia_t"], batch_size=batch_size)
        # PIA and PIAN share the query at t = 0: 3 queries for both, each costs 2 on its own.
        sec = (time.perf_counter() - t0) / n
        for name in (pia.PIA, pia.PIAN):
            if name in names:
                scores[name], t_of[name] = out[name], params["pia_t"]
                costs[name] = {"queries_per_image": pia.QUERIES, "seconds_per_image": sec}
    if secmi.SECMI_STAT in names or secmi.SECMI_NN in names:
        t0 = time.perf_counter()
        errors = secmi.t_errors(generator, pool, params["secmi_t"], params["secmi_k"], batch_size)
        sec = (time.perf_counter() - t0) / n
        q = secmi.secmi_queries(params["secmi_t"], params["secmi_k"])
        if secmi.SECMI_STAT in names:
            scores[secmi.SECMI_STAT] = secmi.stat_scores(errors)
            costs[secmi.SECMI_STAT] = {"queries_per_image": q, "seconds_per_image": sec}
        if secmi.SECMI_NN in names:
            t1 = time.perf_counter()
            scores[secmi.SECMI_NN] = secmi.nn_scores(errors, selection, members, seed)
            costs[secmi.SECMI_NN] = {
                "queries_per_image": q,
                "seconds_per_image": sec + (time.perf_counter() - t1) / n,
            }
        for name in (secmi.SECMI_STAT, secmi.SECMI_NN):
            t_of[name] = params["secmi_t"]
    if gsa.GSA in names:
        steps = gsa.gsa_timesteps(generator.num_train_timesteps, params["gsa_timesteps"])
        t0 = time.perf_counter()
        try:
            feats = gsa.gsa_features(generator, pool, steps, seed)
        except ConfigError as exc:
            skipped[gsa.GSA] = str(exc)
        else:
            scores[gsa.GSA] = gsa.classifier_scores(feats, selection, members, seed)
            t_of[gsa.GSA] = list(steps)
            costs[gsa.GSA] = {
                "queries_per_image": len(steps),
                "backward_passes_per_image": 1,
                "seconds_per_image": (time.perf_counter() - t0) / n,
            }
    results: dict[str, Any] = {}
    for name in names:
        if name not in scores:
            continue
        s = scores[name]
        entry: dict[str, Any] = {"t": t_of[name]}
        if name in (secmi.SECMI_NN, gsa.GSA):
            entry["trained_on"] = f"selection split ({int(selection.sum())} candidates)"
        else:
            entry["selection_auc_by_t"] = {t_of[name]: roc.summarize(s[selection], members[selection])[roc.AUC]}
        results[name] = entry | roc.summarize(s[evaluation], members[evaluation])
    return results, scores, costs, skipped
