"""The price list of memorization mitigations on a memorizing U-Net (docs/mitigations.md, "U-Net price list").

Set-up (the demo's extract stage, CPU-sized): the 100 LFW faces at 16x16; a seeded half (50) are members, the other
50 are non-members; canaries are planted among the members (one image each copied 2, 4, 8, 16 and 32 times), and
the U-Net of the demo ([16, 32, 32], batch 16, ``--steps`` steps) is trained on them. Faces have no classes, and
condition randomisation / Wen et al.'s mitigation need conditions, so every face gets one of 10 *pseudo-captions*
(a seeded assignment; a canary's copies share its caption), the class-label analogue of a caption.

Arms (each a training or sampling option of the library):

* ``none``;
* ``dedup``: ``data.dedup=0.05`` semantics (:func:`diffaudit.data.dedup.deduplicate` after planting), same steps;
* ``dedup-epochs``: the same, with the steps scaled to the smaller set (the same passes per image as ``none``);
* ``condrand``: ``train.cond_random_prob`` (Somepalli et al. 2023);
* ``dp``: ``train.dp_epsilon`` (DP-SGD, Opacus accounting);
* ``wen``: Wen et al.'s inference-time mitigation on the ``none`` model (``guards.mitigations.sample_wen``);
* ``amg``: anti-memorization guidance on the ``none`` model against an index of its training faces;
* ``amg-margin2``: the same, pushing a near-copy to twice the trigger distance.

Per arm: extraction over ``--per-label`` generations of each caption (Carlini's cliques, the adaptive ratio,
generations within delta 0.15 of a member, canaries reproduced); LiRA online with two shadow models trained on
complementary halves of the 100 faces with the same planting and mitigation (so each face has exactly one IN and
one OUT shadow) — ``--shadows 0`` skips it (then the loss-threshold attack only); FID / precision / recall on 8x8
area-downsampled pixels against the 100 real faces; seconds for training, the mitigation and sampling.

Run several arms in parallel processes, then collect::

    export OMP_NUM_THREADS=1; X="nohup nice .venv/bin/python examples/mitigation_unet_experiments.py --out /tmp/mu"
    $X --arms none,wen,amg & $X --arms dedup,condrand & $X --arms dp &
    .venv/bin/python examples/mitigation_unet_experiments.py --out /tmp/mu --collect runs/mitigations-unet
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.attacks import extraction as ex
from diffaudit.attacks.mia import DEFAULT_TIMESTEPS, lira_online, loss_statistic, loss_threshold_scores, sample_losses
from diffaudit.attacks.roc import summarize
from diffaudit.attacks.untargeted import untargeted_extraction
from diffaudit.config import apply_overrides, get_preset
from diffaudit.data.canaries import plant_canaries
from diffaudit.data.dedup import deduplicate
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.distances import nearest_neighbors
from diffaudit.io import atomic_write_json
from diffaudit.metrics.distribution import fid, precision_recall

COPY_COUNTS = (2, 4, 8, 16, 32)
TRAINED = ("none", "dedup", "dedup-epochs", "condrand", "dp")
ARMS = (*TRAINED, "wen", "amg", "amg-margin2")
CAPTIONS = tuple(f"caption {i}" for i in range(10))


def faces(seed: int) -> tuple[ImageSet, np.ndarray]:
    """The 100 faces at 16x16 with seeded pseudo-captions, and the member mask of the target model."""
    data = load_source("faces", resolution=16)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(len(data)) % len(CAPTIONS))
    data = ImageSet(data.images, labels.astype(np.int64), CAPTIONS, {}, data.ids)
    members = np.zeros(len(data), bool)
    members[rng.permutation(len(data))[: len(data) // 2]] = True
    return data, members


def preset(arm: str, args: argparse.Namespace, n_train: int):
    steps = args.steps
    if arm == "dedup-epochs":
        # As many passes over each kept image as the none arm makes over its 107: the steps shrink with the set.
        steps = max(1, round(args.steps * n_train / (len(faces(args.seed)[0]) // 2 + sum(c - 1 for c in COPY_COUNTS))))
    over = [
        "data.resolution=16",
        "model.resolution=16",
        "model.block_out_channels=[16,32,32]",
        "train.batch_size=16",
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        "train.log_every=100",
    ]
    if arm == "condrand":
        over.append(f"train.cond_random_prob={args.cond_random_prob}")
    if arm == "dp":
        over += [f"train.dp_epsilon={args.dp_epsilon}", "train.dp_delta=1e-5"]
    return apply_overrides(get_preset("faces-32"), over)


def train_set(pool: ImageSet, inside: np.ndarray, arm: str, seed: int) -> tuple[ImageSet, list[dict], float]:
    """Members with canaries planted, deduplicated for ``dedup``; the canary table; the mitigation's seconds."""
    planted, table = plant_canaries(pool.subset(inside), COPY_COUNTS, 1, seed=seed)
    start = time.perf_counter()
    if arm.startswith("dedup"):
        planted, _ = deduplicate(planted, 0.05)
    return planted, table, time.perf_counter() - start


def trained_model(arm: str, role: str, data: ImageSet, args: argparse.Namespace) -> tuple[Any, float]:
    """Train (or reuse) the model of ``arm`` for ``role`` (target / shadow0 / shadow1); (generator, seconds)."""
    from diffaudit.generators.classcond import ClassCondGenerator
    from diffaudit.runs import RunDir
    from diffaudit.train import train

    path = args.out / "models" / f"{arm}-{role}"
    timing = path / "seconds.json"
    if not timing.exists():
        resume = (path / "manifest.json").exists()
        start = time.perf_counter()
        with RunDir(path, "train", resume=resume) as run:
            train(preset(arm, args, len(data)), data, run, show_progress=False)
        atomic_write_json(timing, {"seconds": time.perf_counter() - start})
    return ClassCondGenerator.load(path / "model", device="cpu"), float(json.loads(timing.read_text())["seconds"])


def extraction(
    gens: ImageSet, members: ImageSet, fresh: ImageSet, table: list[dict], args: argparse.Namespace
) -> dict[str, Any]:
    """Cliques per caption, the adaptive ratio, generations within delta 0.15 and within a calibrated threshold.

    At 16x16, 0.15 is loose (17 of the 50 non-member faces lie within 0.15 of a member), so copies are also
    counted against the split-conformal 2% threshold on the non-member faces' nearest-member distances (with 50
    of them: the smallest, strict), i.e. closer to a member than any fresh real face is.
    """
    from diffaudit.guards.index import calibrate_threshold

    params = ex.ExtractionParams(min_clique=args.min_clique, max_cliques=5)
    records = [
        ex.scan_label(gens.subset(gens.labels == c), members, params, c, CAPTIONS[c]) for c in range(len(CAPTIONS))
    ]
    summary = ex.summarize(records)
    untargeted = untargeted_extraction(gens, members)
    d, idx = nearest_neighbors(gens.images, members.images, k=1)
    within = d[:, 0] <= 0.15
    reproduced = set(members.ids[idx[within, 0]].tolist())
    canaries = {str(r["copies"]): int(r["id"] in reproduced) for r in table}
    threshold, _ = calibrate_threshold(nearest_neighbors(fresh.images, members.images, k=1)[0][:, 0], 0.02)
    copied = d[:, 0] < threshold
    copied_ids = set(members.ids[idx[copied, 0]].tolist())
    return {
        "copy_threshold": float(threshold),
        "generations_copied": int(copied.sum()),
        "members_copied": len(copied_ids),
        "canaries_copied": f"{sum(r['id'] in copied_ids for r in table)}/{len(table)}",
        "clique_extracted": summary[ex.NUM_EXTRACTED],
        "flagged_cliques": summary[ex.FLAGGED_CLIQUES],
        "adaptive_ratio_extracted": len(untargeted["extracted_train_ids"]),
        "generations_within_delta": int(within.sum()),
        "members_within_delta": len(reproduced),
        "canaries_reproduced": f"{sum(canaries.values())}/{len(canaries)}",
        "canaries_by_copies": canaries,
        "median_nearest_member_l2": float(np.median(d[:, 0])),
    }


def quality(gens: ImageSet, real: ImageSet) -> dict[str, float]:
    """FID, precision, recall on 8x8 area-downsampled pixels in [0, 1] (64-d) against all 100 real faces."""

    def feats(x: np.ndarray) -> np.ndarray:
        n = len(x)
        return x.reshape(n, 8, 2, 8, 2).mean((2, 4)).reshape(n, -1).astype(np.float64) / 255.0

    g, r = feats(gens.images[:, 0]), feats(real.images[:, 0])
    prec, rec = precision_recall(g, r)
    return {"fid_pixels8": fid(g, r), "precision": prec, "recall": rec}


def membership(arm: str, gen: Any, pool: ImageSet, members: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Loss attack and LiRA online (two complementary-half shadows with the same mitigation) over the 100 faces."""
    stat = loss_statistic(sample_losses(gen, pool, DEFAULT_TIMESTEPS, noise_draws=1, seed=args.seed)).mean(axis=1)
    out: dict[str, Any] = {}
    loss = summarize(loss_threshold_scores(stat), members)
    out["loss_auc"], out["loss_tpr_at_1pct_fpr"] = float(loss["auc"]), float(loss["tpr@1%fpr"])
    if args.shadows <= 0:
        return out
    half = np.zeros(len(pool), bool)
    half[np.random.default_rng([args.seed, 99]).permutation(len(pool))[: len(pool) // 2]] = True
    stats, inside, seconds = [], [], 0.0
    for k, mask in enumerate((half, ~half)):
        data, _, _ = train_set(pool, mask, arm, args.seed + 1 + k)
        shadow, s = trained_model(arm, f"shadow{k}", data, args)
        seconds += s
        losses = sample_losses(shadow, pool, DEFAULT_TIMESTEPS, noise_draws=1, seed=args.seed)
        stats.append(loss_statistic(losses).mean(axis=1))
        inside.append(mask)
    scores, _ = lira_online(stat, np.stack(stats, axis=1), np.stack(inside))
    lira = summarize(scores, members)
    out["lira_auc"], out["lira_tpr_at_1pct_fpr"] = float(lira["auc"]), float(lira["tpr@1%fpr"])
    out["shadow_train_seconds"] = round(seconds, 1)
    return out


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    from diffaudit.guards.index import TrainingIndex
    from diffaudit.guards.mitigations import AMGConfig, WenConfig, sample_amg, sample_wen

    pool, members = faces(args.seed)
    base = "none" if arm in ("wen", "amg", "amg-margin2") else arm
    data, table, mitigation_s = train_set(pool, members, base, args.seed)
    gen, train_s = trained_model(base, "target", data, args)
    member_set = pool.subset(members)
    n = args.per_label
    labels = np.repeat(np.arange(len(CAPTIONS)), n)
    seeds = list(range(len(labels)))
    kw = {"sampler": "ddpm", "num_steps": args.num_steps, "guidance_scale": 2.0, "batch_size": 100}
    row: dict[str, Any] = {"mitigation": arm, "train_images": len(data), "removed_before_training": 0}
    row["train_steps"] = preset(base, args, len(data)).train.steps
    start = time.perf_counter()
    if arm == "wen":
        # Target: the median first-step gap of the none model over these requests (the top half is mitigated).
        gap = gen.guidance_gap(labels, seeds, num_steps=args.num_steps, measure_steps=1)
        cfg = WenConfig(target=float(np.median(gap)), max_steps=10, lr=0.1, num_steps=args.num_steps)
        gens, rec = sample_wen(gen, labels, seeds, cfg, **kw)
        mitigation_s = rec["seconds"]
        row |= {"wen_target": cfg.target, "wen_gap_before_mean": float(np.mean(rec["gap_before"]))}
        row |= {"wen_gap_after_mean": float(np.mean(rec["gap_after"])), "wen_reached": rec["reached"]}
    elif arm.startswith("amg"):
        # margin 1 pushes a copy exactly to the threshold; margin 2 pushes it twice as far (triggered at 0.15).
        margin = 2.0 if arm == "amg-margin2" else 1.0
        index = TrainingIndex(images=member_set.images, labels=member_set.labels, ids=member_set.ids)
        gens, rec = sample_amg(gen, labels, seeds, index, AMGConfig(threshold=0.15, margin=margin), **kw)
        row |= {"amg_threshold": 0.15, "amg_margin": margin, "amg_pushed_steps": rec["pushes"]}
    else:
        gens = gen.sample(labels, seeds, **kw)
    sample_s = time.perf_counter() - start - (mitigation_s if arm == "wen" else 0.0)
    row["removed_before_training"] = len(plant_canaries(member_set, COPY_COUNTS, 1, seed=args.seed)[0]) - len(data)
    np.savez_compressed(args.out / "arms" / f"{arm}-samples.npz", images=gens.images, labels=gens.labels)
    row |= extraction(gens, member_set, pool.subset(~members), table, args)
    row |= membership(base, gen, pool, members, args)
    if base != arm:
        row["membership_note"] = "same weights as none: a loss attack cannot see a sampling-time mitigation"
    row |= quality(gens, pool)
    row |= {
        "train_seconds": round(train_s, 1),
        "mitigation_seconds": round(mitigation_s, 2),
        "sample_seconds": round(sample_s, 1),
        "samples": len(gens),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if arm == "dp":
        manifest = json.loads((args.out / "models" / "dp-target" / "manifest.json").read_text())
        row["dp_epsilon_spent"] = manifest["dp"]["epsilon_spent"]
        row["dp_noise_multiplier"] = manifest["dp"]["noise_multiplier"]
    return row


def price_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Three panels per arm: extraction (members within delta, adaptive ratio, cliques), attack AUC, FID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["mitigation"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for j, (key, label) in enumerate(
        [
            ("members_copied", "members copied (calibrated)"),
            ("adaptive_ratio_extracted", "adaptive ratio"),
            ("clique_extracted", "cliques"),
        ]
    ):
        axes[0].bar(x + (j - 1) * 0.27, [r.get(key, 0) for r in rows], 0.27, label=label)
    axes[0].set_title("training faces extracted")
    axes[0].legend(fontsize=7)
    for key, label in [("lira_auc", "LiRA"), ("loss_auc", "loss")]:
        axes[1].plot(x, [r.get(key, np.nan) for r in rows], "o", label=label)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].set_title("membership inference AUC")
    axes[1].legend(fontsize=7)
    axes[2].bar(x, [r["fid_pixels8"] for r in rows], 0.5)
    axes[2].set_title("FID (8x8 pixels; lower is better)")
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(args: argparse.Namespace) -> None:
    from diffaudit.runs import RunDir

    rows = [
        json.loads((args.out / "arms" / f"{a}.json").read_text())
        for a in ARMS
        if (args.out / "arms" / f"{a}.json").exists()
    ]
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    with RunDir(args.collect, "mitigations") as run:
        run.write_config(setup)
        for row in rows:
            run.log({k: v for k, v in row.items() if not isinstance(v, dict)})
        atomic_write_json(run.file("results.json"), {"setup": setup, "mitigations": rows})
        price_figure(rows, run.file("price_list.png"))
    for row in rows:
        print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--per-label", type=int, default=50)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--min-clique", type=int, default=5)
    parser.add_argument("--shadows", type=int, default=2, help="0: no LiRA (loss attack only); else 2")
    parser.add_argument("--cond-random-prob", type=float, default=0.3)
    parser.add_argument("--dp-epsilon", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--collect", type=Path, default=None, help="write the mitigations run here from OUT/arms")
    args = parser.parse_args()
    if args.collect is not None:
        collect(args)
        return
    (args.out / "arms").mkdir(parents=True, exist_ok=True)
    for arm in args.arms.split(","):
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r}; choose from {ARMS}")
        row = run_arm(arm, args) | {"setup": {k: v for k, v in vars(args).items() if k not in ("out", "collect")}}
        atomic_write_json(args.out / "arms" / f"{arm}.json", row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)


if __name__ == "__main__":
    main()
