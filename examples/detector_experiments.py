"""How tagless synthetic-image detectors generalise (docs/safeguards.md, "Detecting generated images").

Run (CPU, a few minutes; keep OMP_NUM_THREADS=1 on a shared machine)::

    OMP_NUM_THREADS=1 nice .venv/bin/python examples/detector_experiments.py --out runs/detector-exp

Real images: 8x8 digits, split (seeded) into the generators' training set, the detectors' real training set,
calibration images (held out: they set each threshold at ``--target-fpr``, split-conformal) and fresh real test
images. Generated images come from analytic generators fitted to the generators' training set (closed-form
denoisers, so sampling costs seconds): the detectors train on a Gaussian model's samples (seeds 0..) and are
tested on

* ``same model, other seeds``: the same Gaussian model, disjoint seeds;
* ``other sampling setting``: the same model at temperature 0.8 (analytic models sample exactly, so the
  sampler and step count do not apply to them; temperature is their truncation knob);
* ``other architecture``: a 10-component Gaussian mixture per class;
* ``other data``: a Gaussian model fitted to the other half of the digits (another training set);

each clean, after JPEG (quality 75) and after a 0.75 down-and-up resize; real test images get the same
perturbation, so the false-removal rate is reported per condition too. The ``loss`` detector is the Gaussian
model's own denoising loss: it needs the suspect model and says nothing about other models by design.
Results go to OUT/results.json (a run directory).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from diffaudit.data.sources import load_source
from diffaudit.detectors.synthetic import evaluate_detector, fit_detector
from diffaudit.generators.analytic import AnalyticTrainer
from diffaudit.guards.perturb import Perturbation
from diffaudit.io import atomic_write_json
from diffaudit.runs import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--cnn-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    digits = load_source("digits")
    order = np.random.default_rng(args.seed).permutation(len(digits))
    fit_a, fit_b = digits.subset(order[:600]), digits.subset(order[600:1200])
    real_train, real_cal, real_test = (
        digits.subset(order[1200:1400]),
        digits.subset(order[1400:1600]),
        digits.subset(order[1600:]),
    )
    gauss = AnalyticTrainer("gaussian").fit(fit_a, None, 0, args.seed)
    gmm = AnalyticTrainer("gmm", components=10).fit(fit_a, None, 0, args.seed)
    gauss_b = AnalyticTrainer("gaussian").fit(fit_b, None, 0, args.seed)
    n = args.num_test

    def sample(gen, count, first, **kw):
        kw.setdefault("num_steps", 20)
        return gen.sample(np.arange(count) % 10, list(range(first, first + count)), **kw)

    gen_train = sample(gauss, 400, 0)
    tests = {
        "same model, other seeds": sample(gauss, n, 100_000),
        "other sampling setting (temperature 0.8)": sample(gauss, n, 100_000, temperature=0.8),
        "other architecture (gmm)": sample(gmm, n, 100_000),
        "other data (gaussian on other digits)": sample(gauss_b, n, 100_000),
    }
    perts = [Perturbation("jpeg", {"quality": 75}), Perturbation("resize", {"factor": 0.75})]
    results = {
        "sizes": {
            "real_train": len(real_train),
            "real_calibration": len(real_cal),
            "real_test": len(real_test),
            "generated_train": len(gen_train),
            "generated_test_each": n,
        },
        "target_fpr": args.target_fpr,
        "detectors": {},
    }
    with RunDir(args.out, "detector-experiments") as run:
        run.write_config({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
        for method, params in (("spectral", {}), ("cnn", {"steps": args.cnn_steps}), ("loss", {"generator": gauss})):
            start = time.perf_counter()
            det = fit_detector(
                method, real_cal, real_train, gen_train, args.target_fpr, args.seed, **params
            )  # fmt: skip
            fit_s = time.perf_counter() - start
            res = evaluate_detector(det, real_test, tests, perts, seed=args.seed)
            res["fit_seconds"] = round(fit_s, 2)
            results["detectors"][method] = res
            run.log({"method": method, "fit_seconds": fit_s})
            print_table(method, res)
        atomic_write_json(run.file("results.json"), results)


def print_table(method: str, res: dict) -> None:
    print(f"\n### {method} (fit {res['fit_seconds']} s)")
    conds = list(res["conditions"])
    print("| test set | " + " | ".join(f"{c}: TPR / AUC" for c in conds) + " |")
    print("|---|" + "---|" * len(conds))
    print("| real (false-removal rate) | " + " | ".join(f"{res['conditions'][c]['fpr']:.3f}" for c in conds) + " |")
    for name in res["conditions"]["clean"]["sets"]:
        cells = [res["conditions"][c]["sets"][name] for c in conds]
        print(f"| {name} | " + " | ".join(f"{x['tpr']:.2f} / {x['auc']:.3f}" for x in cells) + " |")


if __name__ == "__main__":
    main()
