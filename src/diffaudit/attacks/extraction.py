"""Training-data extraction by generate-and-filter (Carlini et al. 2023, Sec. 4 and 5; docs/background.md section 1).

Per label (our "prompt"): N generations with logged seeds; tiled L2 (``grid x grid`` tiles, max over tiles)
between all pairs; a graph with an edge where the distance is below ``edge_threshold``; the exact largest clique
(:mod:`diffaudit.attacks.cliques`); the label is flagged when the clique has at least ``min_clique`` members, and
flagged labels are ranked by the mean distance inside the clique. The clique's medoid (the member with the
smallest summed distance to the others) is matched to the training set in normalized L2: extracted when within
``delta``; its eidetic k is the number of training images within ``delta`` of the matched training image
(itself and its duplicates included).

The filter works on an :class:`ImageSet` of generations, never on a model, so scans shard by label or seed
range and tests can plant cliques directly. :func:`diffaudit.attacks.extraction_run.run_extract` drives a whole
audit of any generator (class model, diffusers pipeline, analytic model) into a run directory, one condition at
a time, and resumes a killed run from the conditions already finished. The untargeted filter, the canary report
and the figures live in :mod:`.untargeted`, :mod:`.canary_report` and :mod:`.extraction_plots` (re-exported
here).

Memory: per label the distance matrix is ``N x N`` float32 (1 MB at N = 500); matching goes through
:func:`diffaudit.distances.nearest_neighbors`, blocked against the training set, so neither the number of labels
nor the training-set size enters the peak (generations of finished labels live on disk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from diffaudit import distances
from diffaudit.attacks.cliques import DEFAULT_MAX_NODES, CliqueBudgetExceeded, find_largest_clique
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError

#: Edge threshold (tiled L2) used when not calibrating: the middle of the 0.05-0.15 range of public
#: re-implementations (the paper does not publish its value).
DEFAULT_EDGE_THRESHOLD = 0.1
DEFAULT_MIN_CLIQUE = 10
DEFAULT_DELTA = 0.15
DEFAULT_PER_LABEL = 500

# ---- result keys (per label record; one clique record has the CLIQUE_KEYS) ---------------------------------
LABEL = "label"  # int, -1 for an unconditional model
LABEL_NAME = "label_name"
NUM_GENERATED = "num_generated"
SEEDS = "seeds"  # [first, last] seed of the label's generations
CLIQUE_SIZE = "clique_size"
MEAN_DISTANCE = "mean_distance"  # mean tiled L2 over the clique's pairs (None for a clique of < 2)
FLAGGED = "flagged"  # clique_size >= min_clique
CLIQUE_EXACT = "clique_exact"  # the clique is proven maximum (false only when the search budget ran out)
MEMBERS = "members"  # indices into the label's generations
MEMBER_SEEDS = "member_seeds"
MEMBER_IDS = "member_ids"  # content ids of the members (any of them can be regenerated from its seed)
REPRESENTATIVE = "representative"  # index (into the label's generations) of the clique medoid
REPRESENTATIVE_SEED = "representative_seed"
NEAREST_TRAIN_INDEX = "nearest_train_index"
NEAREST_TRAIN_ID = "nearest_train_id"
NEAREST_TRAIN_DISTANCE = "nearest_train_distance"  # normalized L2
EXTRACTED = "extracted"  # nearest_train_distance <= delta
EIDETIC_K = "eidetic_k"  # training images within delta of the matched training image
CLIQUES = "cliques"  # every clique found for the label (the first is the largest; more with max_cliques > 1)
CLIQUE_KEYS = (
    CLIQUE_SIZE,
    MEAN_DISTANCE,
    FLAGGED,
    CLIQUE_EXACT,
    MEMBERS,
    MEMBER_SEEDS,
    MEMBER_IDS,
    REPRESENTATIVE,
    REPRESENTATIVE_SEED,
    NEAREST_TRAIN_INDEX,
    NEAREST_TRAIN_ID,
    NEAREST_TRAIN_DISTANCE,
    EXTRACTED,
    EIDETIC_K,
)

# ---- summary keys ---------------------------------------------------------------------------------------------
NUM_LABELS = "num_labels"
NUM_FLAGGED = "num_flagged"
NUM_EXTRACTED = "num_extracted"  # distinct training images extracted by flagged cliques
EXTRACTED_TRAIN_IDS = "extracted_train_ids"
RANKING = "ranking"  # flagged labels, by mean distance inside the clique (ascending)
FLAGGED_CLIQUES = "num_flagged_cliques"


@dataclass(frozen=True)
class ExtractionParams:
    """Parameters of the generate-and-filter attack (defaults: the paper's where it gives one).

    Attributes:
        grid: tiles per side of the tiled L2 (paper: 4, i.e. 16 tiles).
        edge_threshold: edge when tiled L2 < this (paper: unpublished; see :mod:`diffaudit.attacks.calibration`).
        min_clique: flag a label when its largest clique has at least this many members (paper: 10).
        delta: normalized-L2 extraction threshold against the training set (paper: 0.15).
        max_cliques: cliques to report per label; 1 is the paper's attack, more peels further disjoint cliques
            (several memorized images behind one label, as with planted canaries sharing a class).
        max_clique_nodes: budget of the exact clique search (see :func:`find_largest_clique`).
    """

    grid: int = 4
    edge_threshold: float = DEFAULT_EDGE_THRESHOLD
    min_clique: int = DEFAULT_MIN_CLIQUE
    delta: float = DEFAULT_DELTA
    max_cliques: int = 1
    max_clique_nodes: int = DEFAULT_MAX_NODES

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or self.grid < 1:
            raise ConfigError(f"grid must be a positive integer, got {self.grid!r}")
        if not self.edge_threshold > 0:
            raise ConfigError(f"edge threshold must be > 0, got {self.edge_threshold!r}")
        if not isinstance(self.min_clique, int) or self.min_clique < 2:
            raise ConfigError(f"min clique size must be an integer >= 2, got {self.min_clique!r}")
        if not self.delta > 0:
            raise ConfigError(f"delta must be > 0, got {self.delta!r}")
        if not isinstance(self.max_cliques, int) or self.max_cliques < 1:
            raise ConfigError(f"max_cliques must be a positive integer, got {self.max_cliques!r}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ---- the filter -----------------------------------------------------------------------------------------------
def _clique_record(
    dist: np.ndarray, members: np.ndarray, seeds: np.ndarray, ids: np.ndarray, exact: bool, min_clique: int
) -> dict:
    sub = dist[np.ix_(members, members)].astype(np.float64)
    k = len(members)
    mean = float(sub[np.triu_indices(k, 1)].mean()) if k >= 2 else None
    # Medoid: the most central member stands for the memorized image (any member would do for a tight clique).
    rep = int(members[int(np.argmin(sub.sum(1)))]) if k else None
    return {
        CLIQUE_SIZE: int(k),
        MEAN_DISTANCE: mean,
        FLAGGED: bool(k >= min_clique),
        CLIQUE_EXACT: bool(exact),
        MEMBERS: [int(m) for m in members],
        MEMBER_SEEDS: [int(seeds[m]) for m in members],
        MEMBER_IDS: [str(ids[m]) for m in members],
        REPRESENTATIVE: rep,
        REPRESENTATIVE_SEED: int(seeds[rep]) if rep is not None else None,
    }


def find_cliques(generations: ImageSet, params: ExtractionParams) -> list[dict[str, object]]:
    """Cliques of the "look alike" graph of one label's generations (no training data involved).

    Args:
        generations: the label's generated images, uint8 ``(N, C, H, W)``; H, W divisible by ``params.grid``.
        params: grid, edge threshold, minimum clique size, number of cliques.

    Returns:
        Up to ``params.max_cliques`` clique records (keys :data:`CLIQUE_SIZE`, :data:`MEAN_DISTANCE`,
        :data:`FLAGGED`, :data:`MEMBERS`, :data:`REPRESENTATIVE`, ...), largest first. The first is always
        present (size 0 for an empty set); later ones only while they reach ``min_clique``.
    """
    n = len(generations)
    seeds = generations.provenance["seed"]
    if n == 0:
        return [
            _clique_record(np.zeros((0, 0)), np.zeros(0, np.int64), seeds, generations.ids, True, params.min_clique)
        ]
    dist = distances.pairwise_tiled_l2(generations.images, generations.images, grid=params.grid)
    adjacency = dist < params.edge_threshold
    # Symmetrize explicitly: the exact recompute can differ from the mirrored fast value by float32 rounding.
    adjacency = adjacency & adjacency.T
    np.fill_diagonal(adjacency, False)
    alive = np.arange(n)
    out: list[dict[str, object]] = []
    while len(out) < params.max_cliques and len(alive):
        try:
            res = find_largest_clique(adjacency[np.ix_(alive, alive)], params.min_clique, params.max_clique_nodes)
            found, exact = res.members, res.exact
        except CliqueBudgetExceeded as exc:
            # A dense graph (a model that emits one image for a whole label) can outrun the exact search. The best
            # clique so far is still a real clique, so a size >= min_clique is still a valid flag; it is recorded
            # as not proven maximum rather than failing the whole audit.
            found, exact = np.sort(exc.best).astype(np.int64), False
        members = alive[found]
        record = _clique_record(dist, members, seeds, generations.ids, exact, params.min_clique)
        if out and not record[FLAGGED]:
            break
        out.append(record)
        if not record[FLAGGED]:
            break
        alive = np.setdiff1d(alive, members)
    return out


# ---- matching against the training set ------------------------------------------------------------------------
def match_training(
    queries: np.ndarray, train: ImageSet, delta: float = DEFAULT_DELTA, block: int = distances.DEFAULT_BLOCK
) -> dict[str, np.ndarray]:
    """Nearest training image (normalized L2) of each query, extraction verdict and eidetic k.

    Args:
        queries: uint8 ``(Q, C, H, W)`` images (clique representatives), same item shape as ``train``.
        train: the training set (duplicates included: they are what eidetic k counts).
        delta: extraction threshold.
        block: rows per block of the distance engine (memory stays bounded by it, not by ``len(train)``).

    Returns:
        ``{NEAREST_TRAIN_INDEX: int64 (Q,), NEAREST_TRAIN_ID: str (Q,), NEAREST_TRAIN_DISTANCE: float32 (Q,),
        EXTRACTED: bool (Q,), EIDETIC_K: int64 (Q,)}``.
    """
    if queries.shape[1:] != train.images.shape[1:]:
        raise DataError(
            f"generations have shape {tuple(queries.shape[1:])} but training images {tuple(train.images.shape[1:])}"
            " (load the training data at the model's resolution and channels)"
        )
    if len(queries) == 0:
        return {
            NEAREST_TRAIN_INDEX: np.zeros(0, np.int64),
            NEAREST_TRAIN_ID: np.zeros(0, np.str_),
            NEAREST_TRAIN_DISTANCE: np.zeros(0, np.float32),
            EXTRACTED: np.zeros(0, bool),
            EIDETIC_K: np.zeros(0, np.int64),
        }
    dist, idx = distances.nearest_neighbors(queries, train.images, k=1, metric="l2", block_q=block, block_r=block)
    nn, d = idx[:, 0], dist[:, 0]
    # "within delta" is inclusive; count_within_radii is strict, so nudge the radius up by one ulp.
    radius = np.full(len(train), np.nextafter(float(delta), np.inf), dtype=np.float64)
    eidetic = distances.count_within_radii(
        train.images[nn], train.images, radius, metric="l2", block_q=block, block_r=block
    )
    return {
        NEAREST_TRAIN_INDEX: nn.astype(np.int64),
        NEAREST_TRAIN_ID: train.ids[nn],
        NEAREST_TRAIN_DISTANCE: d.astype(np.float32),
        EXTRACTED: d <= delta,
        EIDETIC_K: eidetic.astype(np.int64),
    }


def scan_label(
    generations: ImageSet, train: ImageSet, params: ExtractionParams, label: int = -1, label_name: str = ""
) -> dict[str, object]:
    """Filter one label's generations and match its cliques to the training set.

    Returns the label's record: :data:`LABEL`, :data:`LABEL_NAME`, :data:`NUM_GENERATED`, :data:`SEEDS`, the
    fields of its largest clique (:data:`CLIQUE_KEYS`) at top level, and :data:`CLIQUES` with every clique.
    """
    cliques = find_cliques(generations, params)
    reps = [c[REPRESENTATIVE] for c in cliques if c[REPRESENTATIVE] is not None]
    match = match_training(generations.images[np.asarray(reps, dtype=np.int64)], train, params.delta)
    for c, q in zip((c for c in cliques if c[REPRESENTATIVE] is not None), range(len(reps)), strict=True):
        c[NEAREST_TRAIN_INDEX] = int(match[NEAREST_TRAIN_INDEX][q])
        c[NEAREST_TRAIN_ID] = str(match[NEAREST_TRAIN_ID][q])
        c[NEAREST_TRAIN_DISTANCE] = float(match[NEAREST_TRAIN_DISTANCE][q])
        c[EXTRACTED] = bool(match[EXTRACTED][q])
        c[EIDETIC_K] = int(match[EIDETIC_K][q])
    for c in cliques:
        for key in CLIQUE_KEYS:
            c.setdefault(key, None)
    seeds = generations.provenance["seed"]
    record: dict[str, object] = {
        LABEL: int(label),
        LABEL_NAME: label_name,
        NUM_GENERATED: len(generations),
        SEEDS: [int(seeds.min()), int(seeds.max())] if len(seeds) else [],
    }
    record.update({k: cliques[0][k] for k in CLIQUE_KEYS})
    record[CLIQUES] = cliques
    return record


def summarize(records: Sequence[dict[str, object]]) -> dict[str, object]:
    """Counts over label records, and the flagged labels ranked by mean distance inside their clique."""
    flagged = [r for r in records if r[FLAGGED]]
    ranking = sorted(flagged, key=lambda r: (r[MEAN_DISTANCE], r[LABEL]))
    flagged_cliques = [c for r in records for c in r[CLIQUES] if c[FLAGGED]]
    extracted_ids = sorted({str(c[NEAREST_TRAIN_ID]) for c in flagged_cliques if c[EXTRACTED]})
    return {
        NUM_LABELS: len(records),
        NUM_FLAGGED: len(flagged),
        FLAGGED_CLIQUES: len(flagged_cliques),
        NUM_EXTRACTED: len(extracted_ids),
        EXTRACTED_TRAIN_IDS: extracted_ids,
        RANKING: [{LABEL: r[LABEL], LABEL_NAME: r[LABEL_NAME], MEAN_DISTANCE: r[MEAN_DISTANCE]} for r in ranking],
    }


# ---- re-exports: the rest of the attack, importable from here as before ----------------------------------------
# Lazily (PEP 562): those modules import this one's keys, so eager imports here would be circular.
_REEXPORTS = {
    "canary_report": "diffaudit.attacks.canary_report",
    "save_duplication_plot": "diffaudit.attacks.extraction_plots",
    "save_pairs_figure": "diffaudit.attacks.extraction_plots",
    "save_roc_plot": "diffaudit.attacks.extraction_plots",
    "untargeted_extraction": "diffaudit.attacks.untargeted",
}


def __getattr__(name: str) -> object:
    if name in _REEXPORTS:
        import importlib

        return getattr(importlib.import_module(_REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
