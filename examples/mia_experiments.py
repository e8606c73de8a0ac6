"""Membership-inference experiments on CPU: every attack side by side, and dataset inference, over seeds.

Attacks: loss threshold and LiRA (Carlini et al. 2023), PIA/PIAN (Kong et al. 2024), SecMI statistical and neural
(Duan et al. 2023), GSA (Pang et al. 2023); dataset inference (CDI-style, Dubinski et al. 2025).

1. ``overfit``: a 400-digit pool, every model trained long (500 steps, ~80 epochs) on a random half.
2. ``underfit``: all 1797 digits, short training (150 steps, ~5 epochs): a well-generalised model.

Each (experiment, seed) is a normal ``run_mia`` run directory (resumable). Dataset inference then runs on that
run's target: power (suspect = n members vs 100 unseen non-members, smallest n with p < 0.01) and false positives
(suspect and unseen both random halves of the non-members, 25 repeats). Run::

    OMP_NUM_THREADS=1 nice python examples/mia_experiments.py --out runs/mia-experiments --only overfit
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffaudit.attacks import dataset_inference as di
from diffaudit.attacks.mia_run import run_mia, target_generator
from diffaudit.attacks.mia_setup import build_setup
from diffaudit.attacks.shadow import MiaConfig
from diffaudit.config import apply_overrides, get_preset
from diffaudit.data.loading import load_data
from diffaudit.io import atomic_write_json
from diffaudit.runs import RunDir

# A smaller U-Net than the digits-8 preset (16/32 channels, batch 32).
SMALL_MODEL = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "train.batch_size=32"]
TIMESTEPS = (10, 25, 50, 100, 200, 300, 500)
TRAIN = ["train.lr=2e-3", "train.warmup_steps=20"]

EXPERIMENTS = {
    "overfit": dict(
        overrides=SMALL_MODEL + TRAIN + ["train.steps=500"],
        mia=MiaConfig(num_shadows=2, timesteps=TIMESTEPS, noise_draws=2, pool_size=400, batch_size=256),
    ),
    "underfit": dict(
        overrides=SMALL_MODEL + TRAIN + ["train.steps=150"],
        mia=MiaConfig(num_shadows=2, timesteps=TIMESTEPS, noise_draws=2, pool_size=None, batch_size=256),
    ),
}
DI_CONFIG = di.DatasetInferenceConfig(noise_draws=2, permutations=199)
KEYS = ("t", "auc", "tpr@1%fpr", "tpr@0.1%fpr", "num_members", "num_nonmembers", "below_resolution")


def dataset_inference_study(gen, pool, members: np.ndarray, seed: int, repeats: int = 25) -> dict[str, object]:
    """Power (images needed for p < 0.01 with members as suspects) and false positives (non-members only)."""
    t0 = time.perf_counter()
    feats = di.image_features(gen, pool, dataclasses.replace(DI_CONFIG, seed=seed))
    seconds_features = time.perf_counter() - t0
    rng = np.random.default_rng([seed, 99])
    mem, non = np.flatnonzero(members), np.flatnonzero(~members)
    needed = []
    for r in range(5):
        unseen = rng.choice(non, 100, replace=False)
        suspect = rng.choice(mem, min(500, len(mem)), replace=False)
        n, rows = di.images_needed(feats[suspect], feats[unseen], 0.01, DI_CONFIG.permutations, seed * 100 + r)
        needed.append({"needed": n, "p_by_size": {row["num_suspect"]: row["p_value"] for row in rows}})
    null_p = []
    for r in range(repeats):
        perm = rng.permutation(non)
        half = len(perm) // 2
        null_p.append(di.dataset_test(feats[perm[:half]], feats[perm[half:]], DI_CONFIG.permutations, r)["p_value"])
    null_p = np.array(null_p)
    return {
        "power": needed,
        "null_p_values": null_p.tolist(),
        "fpr_at_0.05": float((null_p < 0.05).mean()),
        "fpr_at_0.01": float((null_p < 0.01).mean()),
        "null_set_sizes": [len(non) // 2, len(non) - len(non) // 2],
        "seconds_features_per_image": seconds_features / len(pool),
        "seconds": time.perf_counter() - t0,
    }


def rescore(run_dir: Path, mcfg: MiaConfig, setup) -> tuple[dict, np.ndarray, object]:  # noqa: ANN001
    """Re-run the query attacks (PIA ... GSA) of a finished run on its saved target, keeping its loss/LiRA results
    (no retraining: for runs whose preset gained fields since, so that their shard keys no longer match).
    Writes ``rescored.json`` in the run directory."""
    from diffaudit.attacks.mia_queries import run_query_attacks
    from diffaudit.generators import load_generator

    results = json.loads((run_dir / "results.json").read_text())
    with np.load(run_dir / "membership.npz", allow_pickle=False) as z:
        if not np.array_equal(z["ids"], setup.pool.ids):
            raise SystemExit(f"{run_dir}: the pool differs from this setup's")
        members, selection = z["target_membership"], z["selection"]
    gen = load_generator(run_dir / "models" / "target" / "model", device="cpu")
    q, _, costs, skipped = run_query_attacks(
        gen, setup.pool, members, selection, mcfg.query_attacks, mcfg.query_params(), mcfg.seed, 64
    )
    results["attacks"].update(q)
    results["costs"].update(costs)
    results["skipped"] = skipped
    atomic_write_json(run_dir / "rescored.json", results)
    return results, members, gen


def markdown_tables(summary: dict[str, dict]) -> str:
    """Attack x experiment table: mean and (min, max) over seeds of AUC and TPR at 1% / 0.1% FPR; costs; and
    the dataset-inference rows."""
    lines = []
    for name in EXPERIMENTS:
        runs = [v for k, v in sorted(summary.items()) if k.rsplit("-s", 1)[0] == name]
        if not runs:
            continue
        lines += [
            f"\n{name}: {len(runs)} seeds, {runs[0]['pool']['evaluation']} evaluation candidates\n",
            "| attack | AUC mean (min-max) | TPR@1% mean (min-max) | TPR@0.1% mean (min-max) | queries/img | s/img |",
            "|---|---|---|---|---|---|",
        ]
        for attack in runs[0]["attacks"]:
            cells = []
            for key in ("auc", "tpr@1%fpr", "tpr@0.1%fpr"):
                v = np.array([r["attacks"][attack][key] for r in runs])
                below = key in runs[0]["attacks"][attack]["below_resolution"]
                cells.append(f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f}){' *' if below else ''}")
            cost = runs[0]["costs"][attack]
            sec = [r["costs"][attack]["seconds_per_image"] for r in runs if r["costs"][attack]["seconds_per_image"]]
            lines.append(
                f"| {attack} | {' | '.join(cells)} | {cost['queries_per_image']} | {np.mean(sec):.3g} |"
                if sec
                else f"| {attack} | {' | '.join(cells)} | {cost['queries_per_image']} | - |"
            )
        needed = [p["needed"] for r in runs for p in r["dataset_inference"]["power"]]
        fpr05 = [r["dataset_inference"]["fpr_at_0.05"] for r in runs]
        fpr01 = [r["dataset_inference"]["fpr_at_0.01"] for r in runs]
        lines.append(
            f"\ndataset inference: images needed for p < 0.01 (5 draws x {len(runs)} seeds): {needed}; "
            f"null FPR at 0.05: {fpr05} (pooled {np.mean(fpr05):.3f}), at 0.01: {fpr01}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mia-experiments"))
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--table", action="store_true", help="print the markdown tables of summary.json and exit")
    parser.add_argument("--rescore", action="store_true", help="finished runs: re-run only the query attacks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    summary_path = args.out / "summary.json"
    if args.table:
        print(markdown_tables(json.loads(summary_path.read_text())))
        return
    for name in args.only or list(EXPERIMENTS):
        exp = EXPERIMENTS[name]
        preset = apply_overrides(get_preset("digits-8"), exp["overrides"])
        data, _ = load_data(preset.data)
        for seed in args.seeds:
            mcfg = dataclasses.replace(exp["mia"], seed=seed)
            t0 = time.perf_counter()
            setup, _ = build_setup(mcfg, preset, data)
            run_dir = args.out / f"{name}-s{seed}"
            if args.rescore and (run_dir / "results.json").exists():
                results, members, gen = rescore(run_dir, mcfg, setup)
                study = dataset_inference_study(gen, setup.pool, members, seed)
            else:
                with RunDir(run_dir, kind="mia", resume=True) as run:
                    run.write_config({"experiment": name, "preset": preset.to_dict(), "mia": mcfg.__dict__})
                    results = run_mia(mcfg, setup, run, show_progress=False)
                    members = np.load(run.file("membership.npz"))["target_membership"]
                    study = dataset_inference_study(target_generator(setup, run), setup.pool, members, seed)
            row = {
                "seconds": time.perf_counter() - t0,
                "pool": results["pool"],
                "train_steps": preset.train.steps,
                "attacks": {k: {m: v.get(m) for m in KEYS} for k, v in results["attacks"].items()},
                "costs": results["costs"],
                "dataset_inference": study,
            }
            print(json.dumps({f"{name}-s{seed}": row["attacks"]}, indent=1), flush=True)
            latest = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            atomic_write_json(summary_path, latest | {f"{name}-s{seed}": row})


if __name__ == "__main__":
    main()
