"""Training-data extraction by generate-and-filter (Carlini et al. 2023, Sec. 4 and 5; RESEARCH.md section 1).

Per label (our "prompt"): N generations with logged seeds; tiled L2 (``grid x grid`` tiles, max over tiles)
between all pairs; a graph with an edge where the distance is below ``edge_threshold``; the exact largest clique
(:mod:`diffaudit.attacks.cliques`); the label is flagged when the clique has at least ``min_clique`` members, and
flagged labels are ranked by the mean distance inside the clique. The clique's medoid (the member with the
smallest summed distance to the others) is matched to the training set in normalized L2: extracted when within
``delta``; its eidetic k is the number of training images within ``delta`` of the matched training image
(itself and its duplicates included).

The filter works on an :class:`ImageSet` of generations, never on a model, so scans shard by label or seed
range and tests can plant cliques directly. :func:`run_extraction` drives a whole audit into a run directory,
one label at a time, and resumes a killed run from the labels already finished.

Memory: per label the distance matrix is ``N x N`` float32 (1 MB at N = 500); matching goes through
:func:`diffaudit.distances.nearest_neighbors`, blocked against the training set, so neither the number of labels
nor the training-set size enters the peak (generations of finished labels live on disk).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffaudit import distances
from diffaudit.attacks.cliques import DEFAULT_MAX_NODES, CliqueBudgetExceeded, find_largest_clique
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.io import atomic_path, atomic_write_json
from diffaudit.progress import progress_bar
from diffaudit.runs import RunDir

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
def _clique_record(dist: np.ndarray, members: np.ndarray, seeds: np.ndarray, exact: bool, min_clique: int) -> dict:
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
        return [_clique_record(np.zeros((0, 0)), np.zeros(0, np.int64), seeds, True, params.min_clique)]
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
        record = _clique_record(dist, members, seeds, exact, params.min_clique)
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


# ---- untargeted (unconditional) mode --------------------------------------------------------------------------
def untargeted_extraction(
    generations: ImageSet,
    train: ImageSet,
    delta: float = DEFAULT_DELTA,
    grid: int = 4,
    alpha: float = 0.5,
    n_neighbors: int = 50,
) -> dict[str, object]:
    """Carlini's adaptive-ratio filter (Sec. 5) over all generations, summarised per training image.

    Returns ``{"summary": memorization summary, "extracted_train_ids": [...], "within_delta_train_ids": [...],
    "pairs": [{"generation": i, "seed", "train_index", "train_id", "l2", "ratio"}] sorted by l2}`` where
    pairs lists generations extracted by the adaptive ratio (R <= 1) *and* within ``delta``.
    """
    from diffaudit.metrics import memorization as mem

    rep = mem.memorization_report(generations.images, train.images, delta, grid, alpha, n_neighbors)
    extracted, within = rep[mem.EXTRACTED], rep[mem.WITHIN_DELTA]
    nn = rep[mem.NN_INDEX]
    hits = np.flatnonzero(extracted & within)
    hits = hits[np.argsort(rep[mem.NN_L2][hits], kind="stable")]
    seeds = generations.provenance["seed"]
    return {
        "summary": rep[mem.SUMMARY],
        "extracted_train_ids": sorted({str(train.ids[i]) for i in nn[extracted]}),
        "extracted_and_within_delta_train_ids": sorted({str(train.ids[nn[i]]) for i in hits}),
        "within_delta_train_ids": sorted({str(train.ids[i]) for i in nn[within]}),
        "pairs": [
            {
                "generation": int(i),
                "seed": int(seeds[i]),
                "train_index": int(nn[i]),
                "train_id": str(train.ids[nn[i]]),
                "l2": float(rep[mem.NN_L2][i]),
                "ratio": float(rep[mem.ADAPTIVE_RATIO][i]),
            }
            for i in hits
        ],
    }


# ---- ground truth by construction (planted canaries) ----------------------------------------------------------
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


# ---- figures --------------------------------------------------------------------------------------------------
def save_pairs_figure(pairs: Sequence[tuple[np.ndarray, np.ndarray, float, str]], path: str | Path) -> Path:
    """PNG of rows "generation | training image | distance"; ``pairs`` holds uint8 ``(C, H, W)`` images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(pairs))
    fig, axes = plt.subplots(rows, 2, figsize=(3.2, 1.5 * rows), squeeze=False)
    for r in range(rows):
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
        if not pairs:
            axes[r][0].set_title("no extracted pairs", fontsize=7)
            continue
        gen, tr, d, caption = pairs[r]
        for a, img in zip(axes[r], (gen, tr), strict=True):
            a.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
        axes[r][0].set_title(caption, fontsize=6)
        axes[r][1].set_title(f"train, l2={d:.3f}", fontsize=6)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def save_duplication_plot(by_copies: dict[str, dict[str, object]], path: str | Path) -> Path:
    """Extraction rate against duplication count (log x), clique attack and any-generation oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(by_copies, key=int)
    x = [int(k) for k in ks]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(x, [by_copies[k]["clique_rate"] for k in ks], "o-", label="clique attack (flagged, within delta)")
    ax.plot(x, [by_copies[k]["any_rate"] for k in ks], "s--", label="any generation within delta")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("copies in the training set")
    ax.set_ylabel("fraction extracted")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def save_roc_plot(fpr: np.ndarray, tpr: np.ndarray, chosen: tuple[float, float], path: str | Path) -> Path:
    """ROC of the edge threshold calibration with the chosen operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.5, 3))
    ax.plot(fpr, tpr)
    ax.plot([chosen[0]], [chosen[1]], "ro")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("false-edge rate")
    ax.set_ylabel("true-edge rate")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


# ---- a whole audit into a run directory -----------------------------------------------------------------------
#: ``generate(label, seeds) -> ImageSet`` of ``len(seeds)`` uint8 generations carrying the seeds in provenance.
GenerateFn = Callable[[int, Sequence[int]], ImageSet]


def label_seeds(position: int, per_label: int, seed: int) -> range:
    """Seeds of the label at ``position`` in the scan: disjoint ranges, so every generation has its own seed."""
    start = seed + position * per_label
    return range(start, start + per_label)


def run_extraction(
    run: RunDir,
    generate: GenerateFn,
    labels: Sequence[int],
    label_names: Sequence[str],
    train: ImageSet,
    params: ExtractionParams,
    per_label: int = DEFAULT_PER_LABEL,
    seed: int = 0,
    untargeted: bool = False,
    alpha: float = 0.5,
    n_neighbors: int = 50,
    canaries: Sequence[dict[str, object]] | None = None,
    extra_results: dict[str, object] | None = None,
    max_pairs: int = 16,
    show_progress: bool = True,
) -> dict[str, object]:
    """Scan every label into ``run`` (resumable per label) and write results.json, figures and generations.npz.

    Each finished label leaves ``generations/label_<i>.npz`` and one row in metrics.jsonl; on resume those labels
    are read back, not regenerated (generation is per-seed deterministic, so the result is the same).

    Returns the results dict written to ``results.json``.
    """
    if per_label < 1:
        raise ConfigError(f"per-label generation count must be >= 1, got {per_label}")
    if len(labels) == 0:
        raise ConfigError("no labels to scan")
    gen_dir = run.file("generations")
    gen_dir.mkdir(exist_ok=True)
    done = {int(r[LABEL]): r for r in run.rows() if r.get("kind") == "label"}
    records: list[dict[str, object]] = []
    sets: list[ImageSet] = []
    with progress_bar("extract", total=len(labels), enabled=show_progress) as bar:
        for pos, (lab, name) in enumerate(zip(labels, label_names, strict=True)):
            path = gen_dir / f"label_{lab}.npz"
            if lab in done and path.exists():
                record = {k: v for k, v in done[lab].items() if k != "kind"}
                gens = ImageSet.load(path)
            else:
                gens = generate(lab, label_seeds(pos, per_label, seed))
                if len(gens) != per_label:
                    raise DataError(f"generator returned {len(gens)} images for label {lab}, expected {per_label}")
                gens.save(path)
                record = scan_label(gens, train, params, lab, name)
                run.log({"kind": "label", **record})
            records.append(record)
            sets.append(gens)
            bar.update(completed=pos + 1, info=f"flagged {sum(bool(r[FLAGGED]) for r in records)}")
    everything = ImageSet.concat(sets)
    everything.save(run.file("generations.npz"))
    results: dict[str, object] = {"params": params.to_dict(), **(extra_results or {})}
    results["labels"] = sorted(records, key=lambda r: r[LABEL])
    results["summary"] = summarize(records)

    # Side-by-side pairs: flagged clique representatives first (by mean distance), then untargeted hits.
    offsets = np.cumsum([0] + [len(s) for s in sets])
    pairs: list[tuple[np.ndarray, np.ndarray, float, str]] = []
    by_label = {int(r[LABEL]): (pos, r) for pos, r in enumerate(records)}
    for item in results["summary"][RANKING]:
        pos, r = by_label[item[LABEL]]
        for c in r[CLIQUES]:
            if c[FLAGGED] and c[EXTRACTED] and len(pairs) < max_pairs:
                gen = everything.images[offsets[pos] + c[REPRESENTATIVE]]
                pairs.append(
                    (
                        gen,
                        train.images[c[NEAREST_TRAIN_INDEX]],
                        c[NEAREST_TRAIN_DISTANCE],
                        f"{r[LABEL_NAME]} clique {c[CLIQUE_SIZE]}",
                    )
                )
    if untargeted:
        unt = untargeted_extraction(everything, train, params.delta, params.grid, alpha, n_neighbors)
        results["untargeted"] = unt
        seen: set[str] = set()
        for p in unt["pairs"]:
            if len(pairs) >= max_pairs:
                break
            if p["train_id"] in seen:
                continue
            seen.add(p["train_id"])
            pairs.append(
                (
                    everything.images[p["generation"]],
                    train.images[p["train_index"]],
                    p["l2"],
                    f"seed {p['seed']} R={p['ratio']:.2f}",
                )
            )
    if canaries:
        results["canaries"] = canary_report(records, canaries, train, everything, params.delta)
        save_duplication_plot(results["canaries"]["by_copies"], run.file("extraction_vs_duplication.png"))
    save_pairs_figure(pairs, run.file("extracted_pairs.png"))
    atomic_write_json(run.file("results.json"), results)
    return results
