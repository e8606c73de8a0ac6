"""Real extraction experiments (docs/extraction.md reports their numbers).

    OMP_NUM_THREADS=1 nice python examples/extraction_experiments.py faces   [--full] [--out runs/extraction]
    OMP_NUM_THREADS=1 nice python examples/extraction_experiments.py digits  [--full] [--out runs/extraction]
    OMP_NUM_THREADS=1 python examples/extraction_experiments.py memory [--train-size 50000]

* ``faces``: train on the 100 LFW faces until the model memorizes them, then extract over the single "face"
  label (clique filter) and with Carlini's adaptive ratio (untargeted). Default: a shrunk CPU version (16x16,
  U-Net (16, 32, 32), batch 16, 2,500 steps, 500 generations); ``--full``: faces-32 as preset, 6,000 steps.
* ``digits``: train digits-8 with canaries at 1, 2, 4, 8, 16, 32 copies (3 per count) and report extraction rate
  against duplication count, and the clique flag's precision/recall against the planted truth. Default shrunk:
  batch 64, 1,200 steps, 200 generations per label; ``--full``: preset batch 128, 3,000 steps, 500 per label.
* ``memory``: peak resident memory and time of one label's scan (500 generations, 3x32x32) against a synthetic
  training set, to show that the scan is bounded by N x N plus blocks, not by the training-set size.

Each step is a ``diffaudit`` command (train, then extract), so this file is also the worked example of the CLI.
Runs are resumable: re-running continues the train and extract runs that already exist.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "diffaudit"]


def _run(args: list[str]) -> None:
    print("+ diffaudit", " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True)


def _train(out: Path, preset: str, steps: int, overrides: list[str]) -> None:
    if (out / "model" / "model.safetensors").exists():
        print(f"{out}: model exists, not retraining", flush=True)
        return
    sets = [a for s in overrides for a in ("--set", s)]
    resume = ["--resume"] if out.exists() else []
    _run(["train", "--preset", preset, "--steps", str(steps), "--out", str(out), "--grid-images", "16", *sets, *resume])


def _extract(out: Path, args: list[str]) -> dict:
    resume = ["--resume"] if out.exists() else []
    t0 = time.time()
    _run(["extract", "--out", str(out), *args, *resume])
    results = json.loads((out / "results.json").read_text())
    results["_seconds"] = time.time() - t0
    return results


def faces(root: Path, full: bool) -> None:
    if full:
        train_dir, preset, steps, overrides, per_label = root / "faces32-train", "faces-32", 6000, [], 500
    else:
        overrides = [
            "data.resolution=16",
            "model.resolution=16",
            "model.block_out_channels=[16,32,32]",
            "train.batch_size=16",
            "train.checkpoint_every=500",
        ]
        train_dir, preset, steps, per_label = root / "faces16-train", "faces-32", 2500, 500
    t0 = time.time()
    _train(train_dir, preset, steps, overrides)
    print(f"train: {time.time() - t0:.0f} s", flush=True)
    res = _extract(
        root / (train_dir.name.replace("-train", "-extract")),
        [
            "--model",
            str(train_dir),
            "--per-label",
            str(per_label),
            "--untargeted",
            "--calibrate",
            "--max-cliques",
            "20",
        ],
    )
    _print_summary(res)


def digits(root: Path, full: bool) -> None:
    train_dir = root / ("digits-canaries-train" + ("-full" if full else ""))
    overrides = ["data.canaries=[1,2,4,8,16,32]", "data.canaries_per_count=3"]
    if not full:
        overrides += ["train.batch_size=64", "train.checkpoint_every=400"]
    t0 = time.time()
    _train(train_dir, "digits-8", 3000 if full else 1200, overrides)
    print(f"train: {time.time() - t0:.0f} s", flush=True)
    res = _extract(
        root / (train_dir.name.replace("-train", "-extract")),
        ["--model", str(train_dir), "--per-label", "500" if full else "200", "--untargeted", "--calibrate"]
        + ["--max-cliques", "10", "--grid", "2"],
    )
    _print_summary(res)
    print(json.dumps({k: v for k, v in res["canaries"].items() if k != "per_canary"}, indent=1))


def _print_summary(res: dict) -> None:
    s = res["summary"]
    print(json.dumps({k: v for k, v in s.items() if k != "ranking"}, indent=1))
    print("edge threshold:", json.dumps({k: v for k, v in res["edge_threshold"].items() if k != "calibration"}))
    cal = res["edge_threshold"].get("calibration")
    if cal:
        print("calibration: tpr", cal["tpr_at_threshold"], "fpr", cal["fpr_at_threshold"], "auc", cal["auc"])
    if "untargeted" in res:
        u = res["untargeted"]
        print("untargeted summary:", json.dumps(u["summary"]))
        print(
            "untargeted: distinct training images R<=1 and within delta:",
            len(u["extracted_and_within_delta_train_ids"]),
        )
    print(f"extract: {res['_seconds']:.0f} s")


def memory(train_size: int, seed: int = 0) -> None:
    """Peak RSS of one label's scan: 500 generations (3x32x32) with a planted 12-clique vs ``train_size`` images."""
    from diffaudit.attacks import extraction as ex
    from diffaudit.data.imageset import ImageSet

    rng = np.random.default_rng(seed)
    shape = (3, 32, 32)
    train_images = rng.integers(0, 256, size=(train_size, *shape), dtype=np.uint8)
    # ids are content hashes; computing 50k of them is what a real load does too.
    train = ImageSet(train_images, np.zeros(train_size, np.int64), ("x",))
    gens = rng.integers(0, 256, size=(500, *shape), dtype=np.uint8)
    noise = rng.normal(0, 0.01 * 255, size=(12, *shape))
    gens[:12] = np.clip(np.rint(train_images[123][None] + noise), 0, 255).astype(np.uint8)
    g = ImageSet(gens, np.zeros(500, np.int64), ("x",), {"seed": np.arange(500)})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.time()
    rec = ex.scan_label(g, train, ex.ExtractionParams())
    dt = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data_mb = (train_images.nbytes + gens.nbytes) / 2**20
    print(
        json.dumps(
            {
                "train_size": train_size,
                "generations": 500,
                "image_shape": shape,
                "flagged": rec[ex.FLAGGED],
                "clique_size": rec[ex.CLIQUE_SIZE],
                "nearest_train_index": rec[ex.NEAREST_TRAIN_INDEX],
                "extracted": rec[ex.EXTRACTED],
                "scan_seconds": round(dt, 2),
                "input_arrays_mb": round(data_mb, 1),
                "peak_rss_before_scan_mb": round(base, 1),
                "peak_rss_after_scan_mb": round(peak, 1),
            },
            indent=1,
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["faces", "digits", "memory"])
    p.add_argument("--out", type=Path, default=Path("runs/extraction"))
    p.add_argument("--full", action="store_true", help="the full-size run instead of the shrunk CPU one")
    p.add_argument("--train-size", type=int, default=50_000)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.experiment == "faces":
        faces(a.out, a.full)
    elif a.experiment == "digits":
        digits(a.out, a.full)
    else:
        memory(a.train_size)


if __name__ == "__main__":
    main()
