"""Membership-inference experiments on CPU (Carlini et al. 2023, Sec. 5.2, shrunk to minutes).

1. ``overfit``: a small pool of digits, every model trained long on a random half -> members should be
   detectable; LiRA should beat the loss threshold at low FPR.
2. ``underfit``: all 1797 digits, short training -> a model cannot memorize ~900 images in a few epochs,
   so every attack should be near chance.

K is 4 (overfit) and 2 (underfit) instead of the CLI's default 8 to fit the CPU budget of a shared 2-core
machine (about 10 minutes uncontended, much longer when the machine is busy). Run::

    OMP_NUM_THREADS=1 nice python examples/mia_experiments.py --out runs/mia-experiments [--only overfit]

Each experiment writes a normal ``diffaudit mia`` run directory (results.json, scores.json, roc.png, models/)
and is resumable: rerunning skips finished models and cached losses. A summary goes to ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffaudit.attacks.shadow import MiaConfig, run_mia
from diffaudit.config import apply_overrides, get_preset
from diffaudit.data.loading import load_data
from diffaudit.io import atomic_write_json
from diffaudit.runs import RunDir

# A smaller U-Net than the digits-8 preset (16/32 channels, batch 32): ~6 steps/s on one busy core.
SMALL_MODEL = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "train.batch_size=32"]
TIMESTEPS = (10, 25, 50, 100, 200, 300, 500)

EXPERIMENTS = {
    "overfit": dict(
        overrides=SMALL_MODEL + ["train.steps=500", "train.lr=2e-3", "train.warmup_steps=20"],
        mia=MiaConfig(num_shadows=4, timesteps=TIMESTEPS, noise_draws=4, pool_size=200, seed=0),
    ),
    # The CLI default K=8 on the same pool; models 0-4 are identical to "overfit"'s (same seeds, same halves), so
    # copying runs/.../overfit/models into overfit-k8/models first saves their training.
    "overfit-k8": dict(
        overrides=SMALL_MODEL + ["train.steps=500", "train.lr=2e-3", "train.warmup_steps=20"],
        mia=MiaConfig(num_shadows=8, timesteps=TIMESTEPS, noise_draws=4, pool_size=200, seed=0),
    ),
    "underfit": dict(
        overrides=SMALL_MODEL + ["train.steps=150", "train.lr=2e-3", "train.warmup_steps=20"],
        mia=MiaConfig(num_shadows=2, timesteps=TIMESTEPS, noise_draws=2, pool_size=None, seed=0),
    ),
}


def draws_ablation(run_dir: Path, mcfg: MiaConfig) -> dict[str, dict[str, float]]:
    """Re-score a finished run with only the first noise draw, from the per-model loss caches (no new queries).

    Shows what averaging several draws ("strong" LiRA) buys over one fixed draw.
    """
    import numpy as np

    from diffaudit.attacks import mia
    from diffaudit.attacks.shadow import LOSSES_FILE, MATRIX_FILE, evaluate_attacks

    with np.load(run_dir / MATRIX_FILE, allow_pickle=False) as z:
        target_members, shadow_membership, selection = z["target_membership"], z["shadow_membership"], z["selection"]
    out = {}
    for label, variants in (("1 draw", slice(0, 1)), (f"{mcfg.noise_draws} draws", slice(None))):
        stats = []
        for name in ["target"] + [f"shadow-{k:02d}" for k in range(mcfg.num_shadows)]:
            with np.load(run_dir / "models" / name / LOSSES_FILE, allow_pickle=False) as z:
                stats.append(mia.loss_statistic(z["losses"][:, :, variants]))
        results, _ = evaluate_attacks(
            stats[0], np.stack(stats[1:], axis=1), shadow_membership, target_members, selection, mcfg.timesteps
        )
        out[label] = {k: {m: v[m] for m in ("t", "auc", "tpr@1%fpr")} for k, v in results["attacks"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mia-experiments"))
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Merged by experiment name, so experiments can run in separate processes.
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.only or list(EXPERIMENTS):
        exp = EXPERIMENTS[name]
        preset = apply_overrides(get_preset("digits-8"), exp["overrides"])
        data, _ = load_data(preset.data)
        t0 = time.perf_counter()
        with RunDir(args.out / name, kind="mia", resume=True) as run:
            run.write_config({"experiment": name, "preset": preset.to_dict(), "mia": exp["mia"].__dict__})
            results = run_mia(preset, data, run, exp["mia"], show_progress=False)
        seconds = time.perf_counter() - t0
        summary[name] = {
            # A rerun reuses finished models and cached losses: keep the first (full) run's time too.
            "seconds": seconds,
            "seconds_first_run": summary.get(name, {}).get("seconds_first_run", seconds),
            "pool": results["pool"],
            "train_steps": preset.train.steps,
            "attacks": {
                k: {m: v[m] for m in ("t", "auc", "tpr@1%fpr", "tpr@0.1%fpr", "num_members", "num_nonmembers")}
                for k, v in results["attacks"].items()
            },
            "draws_ablation": draws_ablation(args.out / name, exp["mia"]),
        }
        print(json.dumps({name: summary[name]}, indent=1), flush=True)
        latest = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        atomic_write_json(summary_path, latest | {name: summary[name]})


if __name__ == "__main__":
    main()
