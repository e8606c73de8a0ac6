"""The price list of memorization mitigations on one memorizing set-up (docs/mitigations.md).

Run (CPU, about a minute; keep OMP_NUM_THREADS=1 on a shared machine)::

    OMP_NUM_THREADS=1 nice .venv/bin/python examples/mitigation_experiments.py --out runs/mitigations

Set-up (tiny, so that every number is reproducible on a laptop): a seeded subset of ``--members`` 8x8 digits is
the training set, with planted duplicates (canaries: ``--per-count`` images for each copy count 2, 4, 8, 16, 32);
the model is a per-class Gaussian mixture with ``--components`` full-covariance components per class, fitted by EM
(:class:`diffaudit.generators.analytic.AnalyticTrainer`), which memorizes: components collapse onto heavily
duplicated images, exactly the images Carlini et al. extract. Arms:

* ``none``: train on the set as it is;
* ``dedup``: :func:`diffaudit.data.dedup.deduplicate` (normalized L2 <= 0.05) before training.

Per arm: extraction (samples whose nearest training image is closer than the copy threshold calibrated at 1% on
held-out real digits, split-conformal; distinct training images and canaries extracted), LiRA online with
``--shadows`` shadow models (each on a random half of the member+non-member pool, canaries planted and the same
mitigation applied), AUC and TPR at 1% FPR; pixel-space FID, precision and recall against held-out real digits;
fit time. Writes OUT/results.json (a run directory of kind ``mitigations``, which the HTML report tabulates).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.attacks.mia import DEFAULT_TIMESTEPS, lira_online, loss_statistic, sample_losses
from diffaudit.attacks.roc import summarize
from diffaudit.data.canaries import plant_canaries
from diffaudit.data.dedup import deduplicate
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.distances import nearest_neighbors
from diffaudit.generators.analytic import AnalyticTrainer
from diffaudit.guards.index import calibrate_threshold
from diffaudit.io import atomic_write_json
from diffaudit.metrics.distribution import fid, precision_recall
from diffaudit.runs import RunDir

COPY_COUNTS = (2, 4, 8, 16, 32)


def prepare(train: ImageSet, arm: str) -> tuple[ImageSet, float]:
    """The training set an arm actually trains on, and the seconds the mitigation took."""
    start = time.perf_counter()
    if arm == "dedup":
        train, _ = deduplicate(train, 0.05)
    return train, time.perf_counter() - start


def fit(train: ImageSet, components: int, seed: int) -> tuple[Any, float]:
    start = time.perf_counter()
    gen = AnalyticTrainer("gmm", components=components).fit(train, None, 0, seed)
    return gen, time.perf_counter() - start


def run_arm(arm: str, pool: ImageSet, members: np.ndarray, fresh: ImageSet, args: argparse.Namespace) -> dict:
    member_set = pool.subset(members)
    planted, table = plant_canaries(member_set, COPY_COUNTS, args.per_count, seed=args.seed)
    train, mitigation_s = prepare(planted, arm)
    gen, fit_s = fit(train, args.components, args.seed)
    # ---- extraction: copy threshold calibrated on fresh real digits (1% of them would count as "copies")
    d_fresh, _ = nearest_neighbors(fresh.images, member_set.images, k=1)
    thr, _ = calibrate_threshold(d_fresh[:, 0], 0.01)
    n = args.samples
    samples = gen.sample(np.arange(n) % 10, list(range(n)), num_steps=args.steps)
    d, idx = nearest_neighbors(samples.images, member_set.images, k=1)
    hit = d[:, 0] < thr
    extracted_ids = set(member_set.ids[idx[hit, 0]].tolist())
    canaries = {int(row["copies"]): 0 for row in table}
    for row in table:
        canaries[int(row["copies"])] += row["id"] in extracted_ids
    # ---- LiRA online: shadows on random halves of the pool, same planting and mitigation as the target
    stat = loss_statistic(sample_losses(gen, pool, DEFAULT_TIMESTEPS, noise_draws=1, seed=args.seed)).mean(axis=1)
    shadow_stats, membership = [], []
    for k in range(args.shadows):
        half = np.random.default_rng([args.seed, k]).permutation(len(pool))[: len(pool) // 2]
        inside = np.zeros(len(pool), bool)
        inside[half] = True
        s_train, _ = plant_canaries(pool.subset(half), COPY_COUNTS, args.per_count, seed=args.seed + 1 + k)
        s_gen, _ = fit(prepare(s_train, arm)[0], args.components, args.seed + 1 + k)
        losses = sample_losses(s_gen, pool, DEFAULT_TIMESTEPS, noise_draws=1, seed=args.seed)
        shadow_stats.append(loss_statistic(losses).mean(axis=1))  # mean log-loss over the timesteps
        membership.append(inside)
    is_member = np.zeros(len(pool), bool)
    is_member[members] = True
    scores, _ = lira_online(stat, np.stack(shadow_stats, axis=1), np.stack(membership))
    mia = summarize(scores, is_member)
    # ---- quality: pixel-space FID / precision / recall against fresh real digits
    g = samples.images.reshape(n, -1).astype(np.float64) / 255.0
    r = fresh.images.reshape(len(fresh), -1).astype(np.float64) / 255.0
    prec, rec = precision_recall(g, r)
    return {
        "mitigation": arm,
        "train_images": len(train),
        "removed_before_training": len(planted) - len(train),
        "samples": n,
        "copy_threshold": thr,
        "extracted_samples": int(hit.sum()),
        "extracted_distinct": len(extracted_ids),
        "canaries_extracted": {str(c): f"{v}/{args.per_count}" for c, v in sorted(canaries.items())},
        "lira_auc": float(mia["auc"]),
        "lira_tpr_at_1pct_fpr": float(mia["tpr@1%fpr"]),
        "fid_pixels": fid(g, r),
        "precision": prec,
        "recall": rec,
        "mitigation_seconds": round(mitigation_s, 3),
        "fit_seconds": round(fit_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--members", type=int, default=300)
    parser.add_argument("--per-count", type=int, default=2)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shadows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    digits = load_source("digits")
    order = np.random.default_rng(args.seed).permutation(len(digits))
    pool = digits.subset(order[: 2 * args.members])
    fresh = digits.subset(order[2 * args.members :])
    members = np.arange(args.members)
    with RunDir(args.out, "mitigations") as run:
        run.write_config({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
        rows = []
        for arm in ("none", "dedup"):
            row = run_arm(arm, pool, members, fresh, args)
            rows.append(row)
            run.log(row)
            print(row)
        atomic_write_json(run.file("results.json"), {"setup": vars(args) | {"out": str(args.out)}, "mitigations": rows})


if __name__ == "__main__":
    main()
