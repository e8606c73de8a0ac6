"""The damage map: a loop sweep over synthetic share x other settings, paired against the 0% control.

A sweep is a grid of **cells**. The settings varied across cells (``axes``: guidance, fine-tuning budget, ...
any :class:`~diffaudit.loop.config.LoopConfig` field) change generation 0, so each cell is its own loop
experiment (an ordinary loop run directory under ``OUT/cells/<cell>/``); inside a cell the synthetic shares
are arms that share generation 0, the real subsets and the sampling seeds (common random numbers), and every
share is compared with the cell's 0% arm *of the same seed* (the paired difference). Phase 2 adds the
mitigation arms (:mod:`diffaudit.loop.mitigations`) at each cell's smallest collapsing share.

Each cell is a unit of work: a complete cell (``summary.json`` present) is skipped on resume, an incomplete
one resumes generation by generation. The map (``map.json``) is a pure function of the cells' rows keyed by
``(cell, arm, seed, generation)``, so sweeps run on several machines (different seeds or cells) merge into
exactly the map of one run (:func:`merge_sweeps`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.io import atomic_write_json
from diffaudit.loop.config import KEY_ARM, KEY_GENERATION, KEY_REPEAT, SUMMARY_FILE, LoopConfig, replace_config
from diffaudit.loop.mitigations import NONE, apply, check_mitigations, hooks_for, not_applicable

SWEEP_FILE = "sweep.json"
MAP_FILE = "map.json"
CELLS_DIR = "cells"
#: Paired metrics reported per cell and share (those present in the rows).
MAP_METRICS = (
    "all/fid",
    "retrained/fid",
    "heldout/fid",
    "all/recall",
    "all/coverage",
    "all/alignment",
    "retrained/alignment",
    "heldout/alignment",
)
DEFAULT_SHARES = (0.0, 0.033, 0.10, 0.25, 0.50, 1.0)


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep varies and how it reads the result.

    ``shares`` are the arms of every cell (0 = the control, required); ``axes`` pairs of (LoopConfig field,
    values) span the cells; ``mitigations`` other than ``none`` run in phase 2 at ``mitigation_share`` (None:
    each cell's smallest collapsing share, else its smallest damaging share, else its largest share).
    A share *damages* when the paired FID difference's 95% interval lies above 0, and *collapses* when its
    lower end exceeds ``collapse_ratio`` x the control's FID at the read-out generation.
    """

    shares: tuple[float, ...] = DEFAULT_SHARES
    axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    mitigations: tuple[str, ...] = (NONE,)
    mitigation_share: float | None = None
    collapse_ratio: float = 0.5
    scrub_amplitude: float = 48.0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, base: LoopConfig) -> None:
        if 0.0 not in [float(s) for s in self.shares]:
            raise ConfigError(f"sweep shares {list(self.shares)} need 0 (the paired control)")
        if len(set(self.shares)) != len(self.shares) or not all(0.0 <= float(s) <= 1.0 for s in self.shares):
            raise ConfigError(f"sweep shares {list(self.shares)} must be distinct values in [0, 1]")
        names = {f for f in asdict(base)}
        for name, values in self.axes:
            if name not in names or name in ("synthetic_share", "synthetic_count", "seed", "repeats"):
                raise ConfigError(f"--sweep {name}: not a loop setting a sweep can vary")
            if not values:
                raise ConfigError(f"--sweep {name}: give at least one value")
        check_mitigations(self.mitigations)
        if NONE not in self.mitigations:
            raise ConfigError("sweep mitigations must include 'none' (the map the mitigations are read against)")
        for combo in self.combos():
            replace_config(base, **combo).validate()

    def combos(self) -> list[dict[str, Any]]:
        """Every combination of axis values, in axis order."""
        names = [n for n, _ in self.axes]
        return [dict(zip(names, vals, strict=True)) for vals in itertools.product(*[v for _, v in self.axes])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shares": list(self.shares),
            "axes": [[n, list(v)] for n, v in self.axes],
            "mitigations": list(self.mitigations),
            "mitigation_share": self.mitigation_share,
            "collapse_ratio": self.collapse_ratio,
            "scrub_amplitude": self.scrub_amplitude,
        }


def share_arm(share: float) -> str:
    """Arm name of a share: ``share-0``, ``share-3.3``, ``share-100``."""
    return f"share-{round(100 * float(share), 3):g}"


def cell_id(combo: dict[str, Any], mitigation: str = NONE, share: float | None = None) -> str:
    """Directory name of a cell: ``guidance_scale-7.5__finetune_budget-0.1`` (+ ``__<mitigation>-at-<arm>``)."""
    parts = [f"{k}-{v}" for k, v in combo.items()] or ["base"]
    if mitigation != NONE:
        parts.append(f"{mitigation}-at-{share_arm(share or 0.0)}")
    return "__".join(str(p).replace("/", "_").replace(" ", "") for p in parts)


# ---- running ----------------------------------------------------------------------------------------------
def _run_cell(
    base: LoopConfig,
    combo: dict[str, Any],
    shares: Sequence[float],
    mitigation: str,
    root: Path,
    real: ImageSet,
    data_info: dict[str, Any],
    spec: SweepSpec,
    show_progress: bool,
    plots: bool = True,
) -> Path:
    from diffaudit.loop.experiment import Experiment, run_experiment

    share = shares[-1] if mitigation != NONE else None
    path = root / CELLS_DIR / cell_id(combo, mitigation, share)
    if (path / SUMMARY_FILE).is_file():
        return path  # a complete cell: resume skips it
    cfg = apply(mitigation, replace_config(base, **combo))
    arms = {share_arm(s): replace_config(cfg, synthetic_share=float(s), synthetic_count=None) for s in shares}
    hooks, _ = hooks_for(mitigation, real, spec.scrub_amplitude)
    exp = Experiment(arms, name=path.name, hooks=hooks)
    run_experiment(
        exp, path, resume=path.exists(), real=real, show_progress=show_progress, data_info=data_info, plots=plots
    )
    return path


def run_sweep(
    base: LoopConfig,
    spec: SweepSpec,
    out: str | os.PathLike[str],
    resume: bool = False,
    real: ImageSet | None = None,
    data_info: dict[str, Any] | None = None,
    show_progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Run every cell of the sweep into ``out`` (phase 1: the map; phase 2: mitigations); returns the map.

    ``base`` is the loop setting every cell starts from (its ``synthetic_share`` is replaced by each share,
    ``seed .. seed + repeats - 1`` are the seeds). Bad settings raise before ``out`` is created.
    """
    from diffaudit.loop.plan import load_real
    from diffaudit.runs import RunDir

    spec.validate(base)
    if real is None:
        real, data_info = load_real(base)
    data_info = data_info or {"source": "given"}
    with RunDir(out, kind="loop-sweep", resume=resume) as run:
        run.write_config({"sweep": spec.to_dict(), "base": base.to_dict(), "data_info": data_info})
        root = run.path
        for combo in spec.combos():
            _run_cell(base, combo, spec.shares, NONE, root, real, data_info, spec, show_progress, plots)
        doc = build_map(collect_cells([root]), spec, base.poison_generations)
        for combo in spec.combos():
            key = cell_id(combo)
            target = spec.mitigation_share
            if target is None:
                target = doc["cells"][key]["mitigation_share"]
            for m in spec.mitigations:
                if m == NONE:
                    continue
                why = not_applicable(m, replace_config(base, **combo), float(target))
                if why is None:
                    cell_shares = (0.0, float(target))
                    _run_cell(base, combo, cell_shares, m, root, real, data_info, spec, show_progress, plots)
        doc = build_map(collect_cells([root]), spec, base.poison_generations, base)
        atomic_write_json(run.file(MAP_FILE), doc)
        if plots:
            from diffaudit.loop.sweep_plots import plot_map

            plot_map(doc, root)
    return doc


# ---- the map ----------------------------------------------------------------------------------------------
def collect_cells(roots: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Rows of every cell under the sweep directories ``roots``, keyed ``(arm, seed, generation)``.

    A seed is ``seed + repeat`` of the run that computed it, so runs with different seeds add up; two runs that
    both hold the same (cell, arm, seed, generation) are refused (it would be counted twice).
    """
    cells: dict[str, dict[str, Any]] = {}
    for root in roots:
        cdir = Path(root) / CELLS_DIR
        if not cdir.is_dir():
            raise ConfigError(f"{root}: not a loop sweep (no {CELLS_DIR}/)")
        for path in sorted(p for p in cdir.iterdir() if (p / "metrics.jsonl").is_file()):
            config = json.loads((path / "config.json").read_text())
            arms = config["arms"]
            seed0 = int(next(iter(arms.values()))["seed"])
            cell = cells.setdefault(path.name, {"arms": arms, "rows": {}, "sources": {}})
            if _comparable(cell["arms"]) != _comparable(arms):
                raise ConfigError(f"{path}: its arms differ from another run's cell {path.name} in more than seeds")
            for line in (path / "metrics.jsonl").read_text().splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                key = (row[KEY_ARM], seed0 + int(row[KEY_REPEAT]), int(row[KEY_GENERATION]))
                other = cell["sources"].get(key)
                if other is not None and other != str(root):
                    raise ConfigError(f"{root} and {other} both hold cell {path.name} seed {key[1]}: merge each once")
                cell["sources"][key] = str(root)
                cell["rows"][key] = row
    return cells


def _comparable(arms: dict[str, Any]) -> dict[str, Any]:
    return {a: {k: v for k, v in c.items() if k not in ("seed", "repeats")} for a, c in arms.items()}


def _paired(rows: dict, arm: str, control: str, metric: str, generation: int) -> dict[str, Any] | None:
    from diffaudit.loop.summary import interval

    seeds = sorted({s for (a, s, g) in rows if a == arm and g == generation})
    diffs = {}
    for s in seeds:
        a, c = rows.get((arm, s, generation), {}).get(metric), rows.get((control, s, generation), {}).get(metric)
        if a is not None and c is not None:
            diffs[str(s)] = float(a) - float(c)  # str keys: the map is the same in memory and in JSON
    if not diffs:
        return None
    mean, lo, hi = interval(list(diffs.values()))
    ctl = interval([rows[(control, int(s), generation)][metric] for s in diffs])[0]
    return {"mean": mean, "low": lo, "high": hi, "n": len(diffs), "per_seed": diffs, "control_mean": ctl}


def _cell_map(cell: dict[str, Any], generation: int, ratio: float, control_rows: dict | None = None) -> dict:
    """Paired differences of every share arm against the 0% arm (and ``control_rows``' 0% arm when given)."""
    from diffaudit.loop.summary import summarize

    rows, arms = cell["rows"], cell["arms"]
    control = next(a for a, c in arms.items() if float(c.get("synthetic_share") or 0.0) == 0.0)
    last = max(g for (_, _, g) in rows)
    configs = {a: replace_config(LoopConfig(), **{**c, "repeats": 1}) for a, c in arms.items()}
    by_seed = [{**r, KEY_REPEAT: s} for (_, s, _), r in sorted(rows.items())]
    healing = summarize(by_seed, configs)
    out: dict[str, Any] = {"control_arm": control, "shares": {}}
    for arm, c in arms.items():
        share = float(c.get("synthetic_share") or 0.0)
        if arm == control:
            continue
        paired = {m: p for m in MAP_METRICS if (p := _paired(rows, arm, control, m, generation)) is not None}
        entry: dict[str, Any] = {"share": share, "paired": paired}
        if control_rows is not None:  # mitigation cells: also against the unmitigated control of the same seed
            merged = dict(rows) | {("__none__", s, g): r for (a, s, g), r in control_rows.items() if a == control}
            entry["paired_vs_unmitigated"] = {
                m: p for m in MAP_METRICS if (p := _paired(merged, arm, "__none__", m, generation)) is not None
            }
        entry["residual"] = {m: p for m in ("all/fid", "all/recall") if (p := _paired(rows, arm, control, m, last))}
        heal = healing[arm]["healing"]
        entry["healing"] = {m: {k: heal[m][k] for k in ("ratio", "reason", "repeats")} for m in heal}
        fid = paired.get("all/fid")
        entry["damages"] = bool(fid and fid["n"] >= 2 and fid["low"] > 0)
        entry["collapses"] = bool(entry["damages"] and fid["low"] > ratio * fid["control_mean"])
        out["shares"][arm] = entry
    ordered = sorted(out["shares"].values(), key=lambda e: e["share"])
    out["smallest_damaging_share"] = next((e["share"] for e in ordered if e["damages"]), None)
    out["smallest_collapsing_share"] = next((e["share"] for e in ordered if e["collapses"]), None)
    fallback = ordered[-1]["share"] if ordered else None
    out["mitigation_share"] = out["smallest_collapsing_share"] or out["smallest_damaging_share"] or fallback
    out["seeds"] = sorted({s for (_, s, _) in rows})
    return out


def build_map(
    cells: dict[str, dict[str, Any]], spec: SweepSpec, generation: int, base: LoopConfig | None = None
) -> dict[str, Any]:
    """The damage map of the collected cells (``map.json``): per cell and share the paired differences at
    ``generation`` with 95% intervals over seeds, residuals after healing, healing ratios, and the smallest
    damaging / collapsing share; mitigation cells are also paired with the unmitigated control."""
    doc: dict[str, Any] = {
        "generation": generation,
        "rule": {
            "damages": "95% interval of the paired all/fid difference (share - 0% control, same seed) above 0",
            "collapses": f"its lower end above {spec.collapse_ratio} x the control's FID",
            "interval": "Student-t 95% over seeds; one seed: no interval (never 'damages')",
        },
        "sweep": spec.to_dict(),
        "cells": {},
        "mitigations": {},
    }
    if base is not None:
        doc["base"] = base.to_dict()
    for combo in spec.combos():
        key = cell_id(combo)
        if key in cells:
            doc["cells"][key] = {"axes": combo} | _cell_map(cells[key], generation, spec.collapse_ratio)
    for key, cell in sorted(cells.items()):
        if key in doc["cells"]:
            continue
        combo_key, _, tail = key.rpartition("__")
        mitigation, _, arm = tail.partition("-at-")
        none = cells.get(combo_key) if combo_key else cells.get("base")
        if none is None:
            none = cells.get("base")
        if none is None or not tail:
            continue
        entry = _cell_map(cell, generation, spec.collapse_ratio, control_rows=none["rows"])
        doc["mitigations"].setdefault(combo_key or "base", {})[mitigation] = {"arm": arm} | entry
    return doc


def merge_sweeps(runs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], plots: bool = True) -> dict:
    """Merge sweep directories (different seeds or cells, e.g. one per machine) into ``out``: its ``map.json``
    equals the map of one sweep that ran them all. Cells are copied by reference (``merged_from``)."""
    from diffaudit.runs import RunDir

    if len(runs) < 2:
        raise ConfigError("give at least two loop sweeps to merge")
    paths = [Path(r) for r in runs]
    configs = []
    for p in paths:
        f = p / "config.json"
        if not f.is_file() or "sweep" not in json.loads(f.read_text()):
            raise ConfigError(f"{p}: not a loop sweep directory (no config.json with 'sweep')")
        configs.append(json.loads(f.read_text()))
    first = configs[0]
    for p, c in zip(paths[1:], configs[1:], strict=True):
        if c["sweep"] != first["sweep"]:
            raise ConfigError(f"{p}: its sweep settings differ from {paths[0]}'s")
    cells = collect_cells(paths)
    spec = spec_from_dict(first["sweep"])
    base = replace_config(LoopConfig(), **first["base"])
    doc = build_map(cells, spec, base.poison_generations, replace_config(base, seed=0, repeats=1))
    with RunDir(out, kind="loop-sweep-merge") as run:
        run.write_config({"sweep": first["sweep"], "merged_from": [str(p) for p in paths]})
        atomic_write_json(run.file(MAP_FILE), doc)
        if plots:
            from diffaudit.loop.sweep_plots import plot_map

            plot_map(doc, run.path)
    return doc


def spec_from_dict(d: dict[str, Any]) -> SweepSpec:
    return SweepSpec(
        shares=tuple(d["shares"]),
        axes=tuple((n, tuple(v)) for n, v in d["axes"]),
        mitigations=tuple(d["mitigations"]),
        mitigation_share=d.get("mitigation_share"),
        collapse_ratio=d.get("collapse_ratio", 0.5),
        scrub_amplitude=d.get("scrub_amplitude", 48.0),
    )
