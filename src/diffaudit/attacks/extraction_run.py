"""A whole extraction audit of any Generator into a run directory: :func:`run_extract` (``diffaudit extract``).

The unit of work is one condition (a class, or a prompt): :func:`scan_condition` generates its images from a
seed range, runs the tiled-L2 graph and clique search on them and matches the cliques to the training set. It
is a pure function of (generator, condition, seeds, training set, parameters); each condition leaves a piece
(:mod:`~diffaudit.attacks.extraction_pieces`: its row in ``metrics.jsonl``, ``generations/label_<i>.npz`` and
``.extra.npz``), so a killed run resumes from the conditions already finished and an audit shards by condition
(:mod:`~diffaudit.attacks.extraction_shards`). Every clique keeps its members' seeds and content ids, so any
member can be regenerated from its seed (``keep_generations="cliques"`` keeps no other generation).

The same code runs for diffaudit's class-conditional U-Net, a diffusers text-to-image pipeline directory
(conditions: ``prompts`` or the captions of a ``captioned:DIR`` training set) and the analytic Gaussian/GMM;
the run writes the same files and keys for all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.attacks import extraction as ex
from diffaudit.attacks.calibration import DEFAULT_NOISE_STD, DEFAULT_NUM_PAIRS, DEFAULT_TARGET_FPR
from diffaudit.attacks.extraction_data import TrainingData, open_audit, train_with_canaries
from diffaudit.attacks.extraction_pieces import GEN_DIR, KEEP, finish, has_piece, make_piece
from diffaudit.config import SampleConfig, validate_sample
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import NULL_CONDITION, Generator
from diffaudit.io import atomic_write_json
from diffaudit.progress import progress_bar
from diffaudit.runs import RunDir

KIND = "extract"

REASONS = {
    "per_label": "Carlini et al. generate 500 images per prompt",
    "grid": "4x4 tiles (16), as in Carlini et al. Sec. 4",
    "min_clique": "the paper flags a prompt when the largest clique has >= 10 members",
    "delta": "the paper's (l2, 0.15)-extraction threshold",
    "edge_threshold_default": "the paper does not publish it; 0.1 is the middle of the 0.05-0.15 used by public "
    "re-implementations",
    "edge_threshold_calibrated": "largest tiled-L2 threshold with at most target_fpr false edges between different "
    "training images, planted near-copies (Gaussian pixel noise) as positives",
    "untargeted": "Carlini's adaptive ratio for unconditional models: alpha = 0.5, n = 50",
    "seeds": "label at position p of the scan uses seeds seed + p * per_label + [0, per_label), unless the prompts "
    "file names a first seed",
}


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """ROC calibration of the edge threshold on the training set (see :mod:`diffaudit.attacks.calibration`)."""

    target_fpr: float = DEFAULT_TARGET_FPR
    pairs: int = DEFAULT_NUM_PAIRS
    noise_std: float = DEFAULT_NOISE_STD


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Everything ``diffaudit extract`` does, validated on construction (a bad value is a ConfigError naming it).

    Attributes:
        model: model or run directory, analytic model directory, or diffusers pipeline directory (``sd:PATH``
            accepted); None with ``canaries`` trains a class model with planted duplicates first (RUN/train).
        data: training-set source matched against (any data source: ``digits``, ``folder:DIR``,
            ``captioned:DIR``, ``npz:PATH``), loaded at the generator's image shape; None: the train run's own
            data config (with its canaries re-planted).
        prompts: prompts file (one a line, or JSONL with optional first seeds) for a text-to-image pipeline;
            without it a pipeline takes the unique captions of a ``captioned:`` ``data`` source.
        labels: ``all`` or comma-separated condition names or indices.
        per_label: generations per condition (Carlini: 500).
        seed: first sampling seed (condition at position p uses ``seed + p * per_label + [0, per_label)``).
        sample: sampler settings passed to :meth:`Generator.sample`.
        edge_threshold: tiled-L2 edge threshold; None: the default, or calibrated when ``calibration`` is set.
        calibration: calibrate the edge threshold by ROC on planted copies of training images.
        untargeted: also run the adaptive-ratio filter over all generations, with ``alpha``, ``n_neighbors``.
        canaries, preset, steps, overrides: train a class model with these canary copy counts first.
        resume: continue ``run_dir``; finished conditions are read back, not regenerated.
        keep_generations: ``all`` keeps every generation (``generations.npz``); ``cliques`` keeps only the
            members of flagged cliques and the untargeted hits (results.json is the same either way).
        device, dtype: where and in what precision to run (None: ``--device`` / auto).
    """

    model: str | None = None
    data: str | None = None
    prompts: str | None = None
    labels: str = "all"
    per_label: int = ex.DEFAULT_PER_LABEL
    seed: int = 0
    sample: SampleConfig = SampleConfig()
    grid: int = 4
    edge_threshold: float | None = None
    min_clique: int = ex.DEFAULT_MIN_CLIQUE
    delta: float = ex.DEFAULT_DELTA
    max_cliques: int = 1
    calibration: CalibrationConfig | None = None
    untargeted: bool = False
    alpha: float = 0.5
    n_neighbors: int = 50
    canaries: tuple[int, ...] = ()
    preset: str = "digits-8"
    steps: int | None = None
    overrides: tuple[str, ...] = ()
    resume: bool = False
    device: str | None = None
    dtype: str = "auto"
    show_progress: bool = True
    keep_generations: str = "all"

    def __post_init__(self) -> None:
        if self.keep_generations not in KEEP:
            raise ConfigError(f"keep_generations must be one of {', '.join(KEEP)}, got {self.keep_generations!r}")
        if self.calibration is not None and self.edge_threshold is not None:
            raise ConfigError("give either an edge threshold or calibration, not both")
        if self.model is None and not self.canaries:
            raise ConfigError("give a model, or canaries to train a model with planted duplicates first")
        if not isinstance(self.per_label, int) or self.per_label < 1:
            raise ConfigError(f"per-label generation count must be >= 1, got {self.per_label!r}")
        if any(not isinstance(c, int) or c < 1 for c in self.canaries):
            raise ConfigError(f"canary copy counts must be positive integers, got {list(self.canaries)}")
        if not self.alpha > 0 or not isinstance(self.n_neighbors, int) or self.n_neighbors < 1:
            raise ConfigError(
                f"untargeted alpha must be > 0 and n_neighbors >= 1, got {self.alpha}, {self.n_neighbors}"
            )
        if self.calibration is not None and not 0 < self.calibration.target_fpr < 1:
            raise ConfigError(f"calibration target FPR must be in (0, 1), got {self.calibration.target_fpr}")
        validate_sample(self.sample, where="sample")
        self.params(self.edge_threshold or ex.DEFAULT_EDGE_THRESHOLD)  # validates grid, min clique, delta

    def params(self, edge_threshold: float) -> ex.ExtractionParams:
        """The filter's parameters at ``edge_threshold``."""
        return ex.ExtractionParams(
            grid=self.grid,
            edge_threshold=edge_threshold,
            min_clique=self.min_clique,
            delta=self.delta,
            max_cliques=self.max_cliques,
        )


# ---- the shard --------------------------------------------------------------------------------------------------
def scan_condition(
    generator: Generator,
    label: int,
    seeds: Sequence[int],
    train: ImageSet,
    params: ex.ExtractionParams,
    sample: SampleConfig,
    label_name: str = "",
) -> tuple[dict[str, object], ImageSet]:
    """Generate ``len(seeds)`` images of condition ``label`` (-1: null) and filter them; a pure function.

    Returns the condition's record (:func:`diffaudit.attacks.extraction.scan_label`: clique size, member seeds
    and ids, nearest training image, extracted, eidetic k) and the uint8 generations (seeds in provenance).
    """
    gens = generator.sample(
        np.full(len(seeds), label, dtype=np.int64),
        [int(s) for s in seeds],
        sampler=sample.sampler,
        num_steps=sample.num_steps,
        guidance_scale=sample.guidance_scale,
        temperature=sample.temperature,
        batch_size=sample.batch_size,
    )
    if len(gens) != len(seeds):
        raise DataError(f"generator returned {len(gens)} images for label {label}, expected {len(seeds)}")
    return ex.scan_label(gens, train, params, label, label_name), gens


def scan_labels(spec: str, conditions: Sequence[str]) -> list[int]:
    from diffaudit.generators.select import parse_labels

    if not conditions:
        return [NULL_CONDITION]
    if spec == "all":
        return list(range(len(conditions)))
    return [int(parse_labels(item.strip(), 1, conditions)[0]) for item in spec.split(",")]


def edge_threshold(config: ExtractConfig, train: ImageSet, roc: Path | None) -> tuple[float, dict[str, object]]:
    """The edge threshold and how it was chosen (calibrated on ``train``, given, or the default).

    Deterministic (calibration draws from ``config.seed``), so every shard of a run computes the same value.
    ``roc``: where to draw the calibration's ROC (None: nowhere).
    """
    if config.calibration is None:
        given = config.edge_threshold is not None
        value = config.edge_threshold if given else ex.DEFAULT_EDGE_THRESHOLD
        return value, {
            "source": "given" if given else "default",
            "value": value,
            "reason": REASONS["edge_threshold_default"],
        }
    from diffaudit.attacks.calibration import calibrate_edge_threshold

    c = config.calibration
    cal = calibrate_edge_threshold(train, config.grid, c.target_fpr, c.pairs, c.noise_std, config.seed)
    if roc is not None:
        ex.save_roc_plot(cal.roc_fpr, cal.roc_tpr, (cal.fpr, cal.tpr), roc)
    chosen = {"source": "calibrated", "value": cal.threshold, "reason": REASONS["edge_threshold_calibrated"]}
    chosen["calibration"] = cal.to_dict()
    return cal.threshold, chosen


def run_config(config: ExtractConfig, audit: TrainingData, labels: list[int]) -> dict[str, Any]:
    return {
        "model": audit.model_path,
        "model_id": audit.generator.model_id,
        "generator": audit.generator.describe(),
        "train": config.data,
        "data": config.data,
        "prompts": config.prompts,
        "train_size": len(audit.train),
        "labels": labels,
        "per_label": config.per_label,
        "seed": config.seed,
        "sample": dataclasses.asdict(config.sample),
        "params": {
            "grid": config.grid,
            "min_clique": config.min_clique,
            "delta": config.delta,
            "max_cliques": config.max_cliques,
            "edge_threshold": config.edge_threshold,
            "calibrate": config.calibration is not None,
        },
        "calibration": None if config.calibration is None else dataclasses.asdict(config.calibration),
        "untargeted": {"alpha": config.alpha, "n_neighbors": config.n_neighbors} if config.untargeted else None,
        "keep_generations": config.keep_generations,
        "reasons": REASONS,
    }


def run_extract(config: ExtractConfig, run_dir: str | Path) -> dict[str, object]:
    """Scan every chosen condition of ``config.model`` into ``run_dir`` and write results.json and figures.

    Files: ``config.json``, ``manifest.json`` (kind ``extract``, edge threshold, canary table),
    ``metrics.jsonl`` (one row per finished condition), ``generations/label_<i>.npz`` and ``.extra.npz`` (the
    condition's piece), ``generations.npz`` (only when keeping all generations),
    ``extracted_pairs.png``, and ``roc.png`` (calibration) / ``extraction_vs_duplication.png`` (canaries).
    The model, prompts and training data are opened (and a pipeline without prompts refused) before the run
    directory is created.

    Returns the results dict written to ``results.json``: ``params``, ``edge_threshold``, ``model_id``,
    ``labels`` (one record per condition), ``summary``, and ``untargeted`` / ``canaries`` when asked.
    """
    run_dir = Path(run_dir)
    audit = open_audit(config) if config.model is not None else None
    with RunDir(run_dir, kind=KIND, resume=config.resume) as run:
        if audit is None:
            model = train_with_canaries(run.file("train"), config)
            audit = open_audit(dataclasses.replace(config, model=str(model)))
        gen, train = audit.generator, audit.train
        labels = scan_labels(config.labels, gen.conditions)
        run.write_config(run_config(config, audit, labels))
        threshold, chosen = edge_threshold(config, train, run.file("roc.png"))
        run.update_manifest(edge_threshold=threshold, canaries=audit.canaries)
        results = {"params": config.params(threshold).to_dict(), "edge_threshold": chosen, "model_id": gen.model_id}
        results.update(_scan_all(run, config, audit, labels, config.params(threshold)))
        atomic_write_json(run.file("results.json"), results)
    return results


def _scan_all(
    run: RunDir, config: ExtractConfig, audit: TrainingData, labels: list[int], params: ex.ExtractionParams
) -> dict[str, object]:
    from diffaudit.generators.select import per_condition_seeds

    _, seeds = per_condition_seeds(labels, config.per_label, config.seed, audit.first_seeds)
    gen_dir = run.file(GEN_DIR)
    gen_dir.mkdir(exist_ok=True)
    done = {int(r[ex.LABEL]): r for r in run.rows() if r.get("kind") == "label"}
    records: list[dict[str, object]] = []
    with progress_bar("extract", total=len(labels), enabled=config.show_progress) as bar:
        for pos, lab in enumerate(labels):
            if lab in done and has_piece(gen_dir, lab):
                record = {k: v for k, v in done[lab].items() if k != "kind"}
            else:
                part = seeds[pos * config.per_label : (pos + 1) * config.per_label]
                record = make_piece(audit, config, params, lab, part, gen_dir)
                run.log({"kind": "label", **record})
            records.append(record)
            bar.update(completed=pos + 1, info=f"flagged {sum(bool(r[ex.FLAGGED]) for r in records)}")
    return finish(run.path, config, audit, labels, params, records)
