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
    generations: ImageSet | None,
    delta: float = DEFAULT_DELTA,
    nearest: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, object]:
    """Extraction rate against duplication count (Carlini Fig. 5 at small scale), and clique-flag precision/recall.

    Args:
        records: label records from :func:`scan_label`.
        canaries: the canary table ``[{"id", "index", "label", "copies"}]`` (train run manifest).
        train: the training set the canaries are in.
        generations: every generation of the scan (for the "any generation within delta" oracle).
        delta: extraction threshold.
        nearest: instead of ``generations``, each canary's nearest generation already found: normalized L2
            float32 ``(C,)`` and its seed int64 ``(C,)``, in table order (:func:`nearest_generations` per block
            of generations, combined by :func:`closest_of`; a sharded scan keeps no other generation).

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
    if nearest is None:
        if generations is None:
            raise DataError("the canary report needs the generations or their nearest generation per canary")
        nearest = nearest_generations(train.images[[first[i] for i in canary_ids]], generations)[:2]
    per: list[dict[str, object]] = []
    for c, d, seed in zip(canaries, nearest[0], nearest[1], strict=True):
        cid = str(c["id"])
        per.append(
            {
                "id": cid,
                "copies": int(c["copies"]),
                "label": int(c["label"]),
                "clique_extracted": cid in clique_hits,
                "nearest_generation_l2": float(d),
                "nearest_generation_seed": int(seed),
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


def canary_images(canaries: Sequence[dict[str, object]], train: ImageSet) -> np.ndarray:
    """uint8 ``(C, ...)``: the first training copy of each canary, in table order."""
    return train.images[[int(np.flatnonzero(train.ids == str(c["id"]))[0]) for c in canaries]]


def nearest_generations(queries: np.ndarray, generations: ImageSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's nearest generation in normalized L2: distance float32 ``(C,)``, seed and index int64 ``(C,)``.

    Exact distances with ties to the lowest index (:func:`diffaudit.distances.nearest_neighbors`), so blocks of
    generations combined by :func:`closest_of` give the answer over all of them.
    """
    if len(generations) == 0:
        n = len(queries)
        return np.full(n, np.inf, np.float32), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    dist, idx = distances.nearest_neighbors(queries, generations.images, k=1, metric="l2")
    index = idx[:, 0].astype(np.int64)
    return dist[:, 0].astype(np.float32), generations.provenance["seed"][index].astype(np.int64), index


def closest_of(blocks: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Combine per-block ``(distance, seed)`` of :func:`nearest_generations`, blocks in generation order.

    The first block with the smallest distance wins, as the lowest index does over all generations at once.
    """
    dist = np.stack([b[0] for b in blocks])
    seeds = np.stack([b[1] for b in blocks])
    best = np.argmin(dist, axis=0)  # argmin returns the first minimum: the earliest block on ties
    cols = np.arange(dist.shape[1])
    return dist[best, cols], seeds[best, cols]
