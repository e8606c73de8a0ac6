"""Extraction cost per extracted image: where a generate-and-filter scan spends its time, and what it finds.

Run: ``python benchmarks/bench_extraction_cost.py --model RUN [--data SRC] [--per-label 500] [--labels all]``.

For each condition it times the three stages of the library's own shard function separately, on the same
generations: sampling (``Generator.sample``), the clique filter with its training-set match
(``extraction.scan_label``), and the untargeted adaptive-ratio report (``memorization_report``). It prints
seconds per generation for each stage, the extracted training images of each method, and seconds per extracted
image (total time / distinct training images extracted). Extraction is a rare event, so the last figure is the
one that tells how many GPU-hours a paper-scale audit needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None, help="training set source (default: the train run's own)")
    ap.add_argument("--labels", default="all")
    ap.add_argument("--per-label", type=int, default=500)
    ap.add_argument("--sampler", default=None, help="sampler (default: the sample command's)")
    ap.add_argument("--num-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    import torch

    from diffaudit.attacks import extraction as ex
    from diffaudit.attacks.extraction_data import open_audit
    from diffaudit.attacks.extraction_run import ExtractConfig, scan_labels
    from diffaudit.config import SampleConfig
    from diffaudit.generators.select import per_condition_seeds
    from diffaudit.metrics import memorization as mem

    if args.threads:
        torch.set_num_threads(args.threads)
    sample = SampleConfig()
    if args.sampler:
        sample = dataclasses.replace(sample, sampler=args.sampler)
    if args.num_steps:
        sample = dataclasses.replace(sample, num_steps=args.num_steps)
    config = ExtractConfig(
        model=args.model, data=args.data, labels=args.labels, per_label=args.per_label, sample=sample
    )
    audit = open_audit(config)
    gen, train = audit.generator, audit.train
    labels = scan_labels(config.labels, gen.conditions)
    _, seeds = per_condition_seeds(labels, config.per_label, config.seed, audit.first_seeds)
    params = config.params(ex.DEFAULT_EDGE_THRESHOLD)
    s = config.sample
    seconds = {"generate": 0.0, "cliques_and_match": 0.0, "untargeted": 0.0}
    clique_ids: set[str] = set()
    untargeted_ids: set[str] = set()
    for pos, lab in enumerate(labels):
        part = [int(x) for x in seeds[pos * config.per_label : (pos + 1) * config.per_label]]
        t0 = time.perf_counter()
        gens = gen.sample(
            np.full(len(part), lab, dtype=np.int64),
            part,
            sampler=s.sampler,
            num_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            temperature=s.temperature,
            batch_size=s.batch_size,
        )
        t1 = time.perf_counter()
        record = ex.scan_label(gens, train, params, lab, audit.label_name(lab))
        t2 = time.perf_counter()
        rep = mem.memorization_report(gens.images, train.images, params.delta, params.grid, 0.5, 50)
        t3 = time.perf_counter()
        seconds["generate"] += t1 - t0
        seconds["cliques_and_match"] += t2 - t1
        seconds["untargeted"] += t3 - t2
        for c in record[ex.CLIQUES]:
            if c[ex.FLAGGED] and c[ex.EXTRACTED]:
                clique_ids.add(str(train.ids[c[ex.NEAREST_TRAIN_INDEX]]))
        hits = np.flatnonzero(np.asarray(rep[mem.EXTRACTED]) & np.asarray(rep[mem.WITHIN_DELTA]))
        untargeted_ids.update(str(train.ids[j]) for j in np.asarray(rep[mem.NN_INDEX])[hits])
    n = len(labels) * config.per_label
    total = sum(seconds.values())
    found = clique_ids | untargeted_ids
    figures = {
        "model": args.model,
        "sampler": f"{s.sampler}-{s.num_steps}",
        "generations": n,
        "train_size": len(train),
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "seconds_per_generation": {k: round(v / n, 4) for k, v in seconds.items()},
        "extracted_train_images": {
            "cliques": len(clique_ids),
            "untargeted": len(untargeted_ids),
            "either": len(found),
        },
        "seconds_per_extracted_image": round(total / len(found), 2) if found else None,
        "generations_per_extracted_image": round(n / len(found), 1) if found else None,
    }
    print(json.dumps(figures, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
