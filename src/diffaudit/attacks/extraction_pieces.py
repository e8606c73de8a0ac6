"""One condition's share of an extraction audit (a "piece"), and the audit's results assembled from pieces.

A piece is everything the rest of the audit needs from one condition, computed where its images were generated
(a worker of a sharded run, or the one process): the condition's record (cliques, matches), the generations it
keeps (all of them, or only the members of flagged cliques and the untargeted hits), and, per generation, the
untargeted filter's statistics (each a function of that generation and the training set alone: the kNN of a
block of queries) and, per canary, its nearest generation among the condition's. Files, in ``GEN_DIR``::

    label_<i>.npz          ImageSet of the kept generations (seeds in provenance)
    label_<i>.extra.npz    kept: int64 (K,) indices into the condition's generations; u_<key>: the untargeted
                           per-generation arrays (memorization PER_SAMPLE_KEYS); c_dist float32 / c_seed int64
                           (C,): each canary's nearest generation of this condition

:func:`finish` turns the pieces of every condition into ``results.json``'s content and the figures; it reads the
same files whether they were written by one process or copied out of shards, so a merged run equals a
one-process run, and the results do not depend on which generations were kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffaudit.attacks import extraction as ex
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.io import atomic_path

if TYPE_CHECKING:
    from diffaudit.attacks.extraction_data import TrainingData
    from diffaudit.attacks.extraction_run import ExtractConfig

GEN_DIR = "generations"
ALL_GENERATIONS = "generations.npz"
#: What a condition keeps on disk: every generation (as before), or only flagged clique members + untargeted hits.
KEEP = ("all", "cliques")
#: Rows of the extracted-pairs figure.
MAX_PAIRS = 16
Pair = tuple[np.ndarray, np.ndarray, float, str]


def images_file(gen_dir: Path, label: int) -> Path:
    return gen_dir / f"label_{label}.npz"


def extra_file(gen_dir: Path, label: int) -> Path:
    return gen_dir / f"label_{label}.extra.npz"


def has_piece(gen_dir: Path, label: int) -> bool:
    return images_file(gen_dir, label).is_file() and extra_file(gen_dir, label).is_file()


def make_piece(
    audit: TrainingData,
    config: ExtractConfig,
    params: ex.ExtractionParams,
    label: int,
    seeds: Sequence[int],
    gen_dir: Path,
) -> dict[str, object]:
    """Generate, filter and match condition ``label`` from ``seeds``; write its piece into ``gen_dir``.

    Returns the condition's record (:func:`diffaudit.attacks.extraction.scan_label`).
    """
    from diffaudit.attacks.canary_report import canary_images, nearest_generations
    from diffaudit.attacks.extraction_run import scan_condition

    train = audit.train
    record, gens = scan_condition(audit.generator, label, seeds, train, params, config.sample, audit.label_name(label))
    extra: dict[str, np.ndarray] = {}
    hits = np.zeros(0, np.int64)
    if config.untargeted:
        from diffaudit.metrics import memorization as mem

        rep = mem.memorization_report(
            gens.images, train.images, params.delta, params.grid, config.alpha, config.n_neighbors
        )
        extra.update({f"u_{k}": np.asarray(rep[k]) for k in mem.PER_SAMPLE_KEYS})
        hits = np.flatnonzero(np.asarray(rep[mem.EXTRACTED]) & np.asarray(rep[mem.WITHIN_DELTA]))
    if audit.canaries:
        dist, seed, _ = nearest_generations(canary_images(audit.canaries, train), gens)
        extra["c_dist"], extra["c_seed"] = dist, seed
    if config.keep_generations == "all":
        kept = np.arange(len(gens), dtype=np.int64)
    else:
        # Members of flagged cliques (the evidence) and untargeted hits (the figure's pairs); any other image
        # is regenerated from its seed, which the record keeps.
        members = [m for c in record[ex.CLIQUES] if c[ex.FLAGGED] for m in c[ex.MEMBERS]]
        kept = np.union1d(np.asarray(members, dtype=np.int64), hits).astype(np.int64)
    extra["kept"] = kept
    gens.subset(kept).save(images_file(gen_dir, label))
    with atomic_path(extra_file(gen_dir, label), suffix=".npz") as tmp:
        np.savez(tmp, **extra)
    return record


class _Pieces:
    """Read access to the pieces of a scan: per-condition arrays, and kept images by (position, index)."""

    def __init__(self, gen_dir: Path, labels: Sequence[int]) -> None:
        self.gen_dir, self.labels = gen_dir, list(labels)
        self._extra = [self._load_extra(lab) for lab in self.labels]
        self._images: dict[int, ImageSet] = {}

    def _load_extra(self, label: int) -> dict[str, np.ndarray]:
        path = extra_file(self.gen_dir, label)
        if not path.is_file():
            raise ConfigError(f"{path}: missing; condition {label} of this scan was not finished")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def column(self, key: str) -> list[np.ndarray]:
        return [e[key] for e in self._extra]

    def image(self, pos: int, index: int) -> np.ndarray:
        """Generation ``index`` of the condition at scan position ``pos`` (it must have been kept)."""
        if pos not in self._images:
            self._images[pos] = ImageSet.load(images_file(self.gen_dir, self.labels[pos]))
        kept = self._extra[pos]["kept"]
        at = int(np.searchsorted(kept, index))
        if at >= len(kept) or kept[at] != index:
            raise ConfigError(f"generation {index} of condition {self.labels[pos]} was not kept; regenerate it")
        return self._images[pos].images[at]


def finish(
    out_dir: Path,
    config: ExtractConfig,
    audit: TrainingData,
    labels: Sequence[int],
    params: ex.ExtractionParams,
    records: Sequence[dict[str, Any]],
) -> dict[str, object]:
    """Results from the pieces in ``out_dir/generations``: records, summary, untargeted, canaries, figures.

    ``records`` are in scan order (one per label). Writes ``generations.npz`` (every generation; only when all
    are kept), ``extracted_pairs.png`` and, with canaries, ``extraction_vs_duplication.png``.
    """
    from diffaudit.attacks.canary_report import canary_report, closest_of
    from diffaudit.attacks.extraction_plots import save_duplication_plot, save_pairs_figure

    gen_dir = out_dir / GEN_DIR
    pieces = _Pieces(gen_dir, labels)
    if config.keep_generations == "all":
        ImageSet.concat([ImageSet.load(images_file(gen_dir, lab)) for lab in labels]).save(out_dir / ALL_GENERATIONS)
    out: dict[str, object] = {"labels": sorted(records, key=lambda r: r[ex.LABEL]), "summary": ex.summarize(records)}
    pairs = _clique_pairs(list(records), pieces, audit.train, out["summary"])
    if config.untargeted:
        unt = _untargeted(pieces, audit, params, config)
        out["untargeted"] = unt
        pairs += _untargeted_pairs(unt, pieces, audit.train, config.per_label, MAX_PAIRS - len(pairs))
    if audit.canaries:
        nearest = closest_of(list(zip(pieces.column("c_dist"), pieces.column("c_seed"), strict=True)))
        out["canaries"] = canary_report(records, audit.canaries, audit.train, None, params.delta, nearest=nearest)
        save_duplication_plot(out["canaries"]["by_copies"], out_dir / "extraction_vs_duplication.png")
    save_pairs_figure(pairs, out_dir / "extracted_pairs.png")
    return out


def _untargeted(
    pieces: _Pieces, audit: TrainingData, params: ex.ExtractionParams, config: ExtractConfig
) -> dict[str, object]:
    """The adaptive-ratio filter over all generations, from the per-condition arrays (generation order)."""
    from diffaudit.attacks.untargeted import untargeted_from_report
    from diffaudit.generators.select import per_condition_seeds
    from diffaudit.metrics import memorization as mem

    rep: dict[str, object] = {k: np.concatenate(pieces.column(f"u_{k}")) for k in mem.PER_SAMPLE_KEYS}
    rep[mem.SUMMARY] = mem.report_summary(
        rep, len(audit.train), params.delta, params.grid, config.alpha, config.n_neighbors
    )
    _, seeds = per_condition_seeds(pieces.labels, config.per_label, config.seed, audit.first_seeds)
    return untargeted_from_report(rep, np.asarray(seeds, dtype=np.int64), audit.train.ids)


def _clique_pairs(
    records: list[dict[str, Any]], pieces: _Pieces, train: ImageSet, summary: dict[str, Any]
) -> list[Pair]:
    """Flagged, extracted clique representatives beside their training match, by mean distance in the clique."""
    by_label = {int(r[ex.LABEL]): (pos, r) for pos, r in enumerate(records)}
    pairs: list[Pair] = []
    for item in summary[ex.RANKING]:
        pos, r = by_label[item[ex.LABEL]]
        for c in r[ex.CLIQUES]:
            if c[ex.FLAGGED] and c[ex.EXTRACTED] and len(pairs) < MAX_PAIRS:
                caption = f"{r[ex.LABEL_NAME]} clique {c[ex.CLIQUE_SIZE]}"
                gen = pieces.image(pos, int(c[ex.REPRESENTATIVE]))
                pairs.append((gen, train.images[c[ex.NEAREST_TRAIN_INDEX]], c[ex.NEAREST_TRAIN_DISTANCE], caption))
    return pairs


def _untargeted_pairs(unt: dict[str, Any], pieces: _Pieces, train: ImageSet, per_label: int, room: int) -> list[Pair]:
    """Untargeted hits (one per training image) beside their training match."""
    pairs: list[Pair] = []
    seen: set[str] = set()
    for p in unt["pairs"]:
        if len(pairs) >= room:
            break
        if p["train_id"] in seen:
            continue
        seen.add(p["train_id"])
        caption = f"seed {p['seed']} R={p['ratio']:.2f}"
        # Generation g of the scan is image g % per_label of the condition at position g // per_label.
        gen = pieces.image(p["generation"] // per_label, p["generation"] % per_label)
        pairs.append((gen, train.images[p["train_index"]], p["l2"], caption))
    return pairs
