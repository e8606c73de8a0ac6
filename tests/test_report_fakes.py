"""Small fake run directories with known results, shared by the report tests (no tests here).

Each writes only the files and keys the real commands write (see a quick demo run), with numbers chosen so
that the expected verdicts and intervals are known in advance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.data.grid import save_grid
from diffaudit.io import append_jsonl, atomic_write_json

EVIL = '<script>alert("x")</script>'


def run_dir(path: Path, kind: str, files: dict[str, Any] | None = None, rows: list[dict] | None = None) -> Path:
    """A finished run of ``kind`` with the given JSON files and metrics rows."""
    path.mkdir(parents=True)
    atomic_write_json(path / "manifest.json", {"kind": kind, "status": "finished", "environment": {"torch": "x"}})
    atomic_write_json(path / "config.json", {"kind": kind})
    for name, data in (files or {}).items():
        atomic_write_json(path / name, data)
    for row in rows or []:
        append_jsonl(path / "metrics.jsonl", row)
    return path


def grid_png(path: Path, seed: int = 0) -> Path:
    save_grid(np.random.default_rng(seed).integers(0, 255, (4, 1, 8, 8), dtype=np.uint8), path)
    return path


def extract_run(path: Path, clique_ids: list[str], adaptive_ids: list[str], num_train: int = 100) -> Path:
    """An extraction run: the two methods' extracted training ids (overlapping ids count once)."""
    results = {
        "params": {"delta": 0.15, "min_clique": 10},
        "edge_threshold": {"source": "calibrated", "value": 0.2},
        "labels": [{"label": 0, "num_generated": 500}],
        "summary": {
            "num_labels": 1,
            "num_flagged": 1,
            "num_extracted": len(clique_ids),
            "extracted_train_ids": clique_ids,
        },
        "untargeted": {
            "summary": {
                "num_generated": 500,
                "num_train": num_train,
                "delta": 0.15,
                "alpha": 0.5,
                "n_neighbors_used": 50,
                "num_extracted": 7,
                "num_train_extracted": len(adaptive_ids),
                "frac_within_delta": 0.02,
            },
            "extracted_train_ids": adaptive_ids,
        },
    }
    run = run_dir(path, "extract", {"results.json": results})
    grid_png(run / "extracted_pairs.png", 1)
    return run


def attack(auc: float, n_in: int, n_out: int, tpr1: float = 0.1) -> dict[str, Any]:
    """One MIA attack entry as ``attacks/roc.summarize`` writes it (resolution flag included)."""
    below = [k for k, f in {"tpr@1%fpr": 0.01, "tpr@0.1%fpr": 0.001}.items() if f < 1.0 / n_out]
    return {
        "t": 100,
        "auc": auc,
        "num_members": n_in,
        "num_nonmembers": n_out,
        "fpr_resolution": 1.0 / n_out,
        "below_resolution": below,
        "tpr@1%fpr": tpr1,
        "tpr@0.1%fpr": 0.0,
        "selection_auc_by_t": {"50": 0.5, "100": 0.6},
    }


def mia_run(path: Path, attacks: dict[str, dict[str, Any]]) -> Path:
    run = run_dir(path, "mia", {"results.json": {"attacks": attacks, "pool": {"pool_size": 200}}})
    grid_png(run / "roc.png", 2)
    return run


def arm(
    fid: list[float], share: float | None, band: float = 0.0, repeats: int = 1, count: int | None = None
) -> dict[str, Any]:
    """A loop arm with an ``all/fid`` curve, a symmetric 95% band of +-``band``, poisoning up to generation 2."""
    return {
        "generations": list(range(len(fid))),
        "phases": ["base"] + ["poison"] * (len(fid) - 1),
        "repeats": list(range(repeats)),
        "curves": {
            "all/fid": {"mean": fid, "low": [v - band for v in fid], "high": [v + band for v in fid]},
            "all/recall": {"mean": [0.5] * len(fid), "low": [0.5] * len(fid), "high": [0.5] * len(fid)},
        },
        "healing": {},
        "config": {
            "mode": "replace",
            "train_size": 900,
            "synthetic_share": share,
            "synthetic_count": count,
            "poison_generations": len(fid) - 1,
            "heal_generations": 0,
        },
    }


def loop_run(path: Path, arms: dict[str, dict[str, Any]], kind: str = "loop") -> Path:
    rows = [
        {"arm": name, "repeat": 0, "generation": g, "all/fid": v}
        for name, a in arms.items()
        for g, v in enumerate(a["curves"]["all/fid"]["mean"])
    ]
    return run_dir(path, kind, {"summary.json": {"experiment": "t", "arms": arms}}, rows)


def guard_run(path: Path, rate: float, n_holdout: int, target: float, blocked: int = 2, images: int = 40) -> Path:
    calibration = {
        "num_holdout": n_holdout,
        "calibrated": {"target_fpr": target, "achieved_false_block_rate": rate, "threshold": 0.08},
        "absolute": {"delta": 0.15, "achieved_false_block_rate": 0.72},
    }
    decisions = {
        "filter": {"rule": "calibrated", "calibration": calibration},
        "summary": {"num_images": images, "num_blocked": blocked, "ms_per_image": 0.1},
        "decisions": [],
    }
    return run_dir(path, "guard-index", {"decisions.json": decisions, "index.json": {"calibration": calibration}})
