"""Ground truth by construction: how well the clique attack recovers planted canaries (Carlini Fig. 5, small).

Canaries are training images duplicated a known number of times (:mod:`diffaudit.data.canaries`); the report
gives the extraction rate against the duplication count, and the precision/recall of the clique flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffaudit import distances
from diffaudit.attacks.extraction import CLIQUES, DEFAULT_DELTA, EXTRACTED, FLAGGED, NEAREST_TRAIN_ID
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import DataError


def canary_report(
    records: Sequence[dict[str, object]],
    canaries: Sequence[dict[str, object]],
    train: ImageSet,
    generations: ImageSet,
    delta: float = DEFAULT_DELTA,
) -> dict[str, object]:
    """Extraction rate against duplication count (Carlini Fig. 5 at small scale), and clique-flag precision/recall.

    Args:
        records: label records from :func:`scan_label`.
        canaries: the canary table ``[{"id", "index", "label", "copies"}]`` (train run manifest).
        train: the training set the canaries are in.
        generations: every generation of the scan (for the "any generation within delta" oracle).
        delta: extraction threshold.

    Returns:
        ``{"by_copies": {copies: {"num", "clique_extracted", "clique_rate", "any_generation", "any_rate"}},
        "precision", "recall", "recall_of_reproduced", "per_canary": [...]}``. Precision: fraction of flagged
        cliques whose match (within delta) is a canary. Recall: fraction of canaries matched by a flagged clique.
        Recall of reproduced: the same among canaries that at least one generation reproduces within delta.
    """
    if not canaries:
        raise DataError("the canary table is empty")
    canary_ids = [str(c["id"]) for c in canaries]
    known = set(train.ids.tolist())
    missing = [i for i in canary_ids if i not in known]
    if missing:
        raise DataError(f"{len(missing)} canary ids (first {missing[0]}) are not in the training set")
    flagged = [c for r in records for c in r[CLIQUES] if c[FLAGGED]]
    clique_hits = {str(c[NEAREST_TRAIN_ID]) for c in flagged if c[EXTRACTED]}
    first = {i: int(np.flatnonzero(train.ids == i)[0]) for i in canary_ids}
    canary_images = train.images[[first[i] for i in canary_ids]]
    dist, gidx = distances.nearest_neighbors(canary_images, generations.images, k=1, metric="l2")
    per: list[dict[str, object]] = []
    for c, d, g in zip(canaries, dist[:, 0], gidx[:, 0], strict=True):
        cid = str(c["id"])
        per.append(
            {
                "id": cid,
                "copies": int(c["copies"]),
                "label": int(c["label"]),
                "clique_extracted": cid in clique_hits,
                "nearest_generation_l2": float(d),
                "nearest_generation_seed": int(generations.provenance["seed"][g]),
                "any_generation_within_delta": bool(d <= delta),
            }
        )
    by_copies: dict[str, dict[str, object]] = {}
    for k in sorted({p["copies"] for p in per}):
        group = [p for p in per if p["copies"] == k]
        hits = sum(p["clique_extracted"] for p in group)
        anyg = sum(p["any_generation_within_delta"] for p in group)
        by_copies[str(k)] = {
            "num": len(group),
            "clique_extracted": hits,
            "clique_rate": hits / len(group),
            "any_generation": anyg,
            "any_rate": anyg / len(group),
        }
    matched_canary = [c for c in flagged if c[EXTRACTED] and str(c[NEAREST_TRAIN_ID]) in set(canary_ids)]
    reproduced = [p for p in per if p["any_generation_within_delta"]]
    return {
        "by_copies": by_copies,
        "num_flagged_cliques": len(flagged),
        "precision": len(matched_canary) / len(flagged) if flagged else None,
        "recall": sum(p["clique_extracted"] for p in per) / len(per),
        "recall_of_reproduced": (
            sum(p["clique_extracted"] for p in reproduced) / len(reproduced) if reproduced else None
        ),
        "per_canary": per,
    }
