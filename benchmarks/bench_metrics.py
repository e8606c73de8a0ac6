"""Benchmark: feature extraction plus every metric for N generated vs N reference images.

Synthetic sets are made by resampling the 1,797 sklearn digits with random shifts and noise: a grey 8x8 set
and a colour 32x32 set (upsampled, tinted). Per stage it reports wall time, the peak of Python/numpy
allocations (tracemalloc; torch's allocator is not traced) and the process's peak resident memory so far
(``ru_maxrss``, monotonic). Run from the repository root::

    .venv/bin/python benchmarks/bench_metrics.py --num-images 10000 --out bench-metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

from diffaudit.data.imageset import ImageSet
from diffaudit.metrics.features import get_extractor

DEFAULT_CONFIGS = "8x1:classifier,8x1:random-cnn,8x1:pixels,32x3:classifier,32x3:random-cnn"


def synthetic_digits(n: int, size: int, channels: int, noise: float, seed: int) -> ImageSet:
    """``n`` digits resampled with +-1 px shifts, Gaussian pixel noise (std ``noise`` in [0,1] units)."""
    rng = np.random.default_rng(seed)
    d = load_digits()
    base = d.images / 16.0  # (1797, 8, 8) in [0, 1]
    idx = rng.integers(0, len(base), n)
    imgs = base[idx]
    shifts = rng.integers(-1, 2, (n, 2))
    imgs = np.stack([np.roll(im, tuple(s), axis=(0, 1)) for im, s in zip(imgs, shifts, strict=True)])
    if size != 8:
        imgs = np.kron(imgs, np.ones((size // 8, size // 8)))  # nearest-neighbour upsampling
    imgs = imgs[:, None]
    if channels == 3:
        tint = rng.uniform(0.5, 1.0, (n, 3, 1, 1))
        imgs = imgs * tint
    imgs = np.clip(imgs + rng.normal(0, noise, imgs.shape), 0, 1)
    return ImageSet(np.round(imgs * 255).astype(np.uint8), d.target[idx], tuple(str(i) for i in range(10)))


def measure(
    name: str, rows: list[dict[str, Any]], tag: dict[str, Any], fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """Run ``fn(*args, **kwargs)`` as stage ``name``; append and print its time and memory row."""
    tracemalloc.start()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row = {
        "stage": name,
        "seconds": round(seconds, 3),
        "traced_peak_mib": round(peak / 2**20, 1),
        "maxrss_mib": round(maxrss_kib / 1024, 1),
        **tag,
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
    return result


def run(num_images: int, configs: list[tuple[int, int, str]], bootstrap: int, memorization: bool) -> list[dict]:
    from diffaudit.metrics.distribution import FID, compute_metrics
    from diffaudit.metrics.memorization import memorization_report

    rows: list[dict[str, Any]] = []
    cache = tempfile.mkdtemp(prefix="bench-feature-cache-")  # a cold cache: the training time counts
    shapes_done: set[tuple[int, int]] = set()
    for size, channels, features in configs:
        tag = {"shape": [channels, size, size], "features": features, "n": num_images}
        ref = synthetic_digits(num_images, size, channels, noise=0.05, seed=1)
        gen = synthetic_digits(num_images, size, channels, noise=0.10, seed=2)
        options = {"cache_dir": cache} if features == "classifier" else {}
        ex = measure("build_extractor", rows, tag, get_extractor, features, ref, **options)
        if ex.describe().get("heldout_accuracy") is not None:
            rows[-1]["heldout_accuracy"] = round(ex.describe()["heldout_accuracy"], 4)
        gf = measure("features_generated", rows, tag, ex, gen)
        rf = measure("features_reference", rows, tag, ex, ref)
        tag_m = {**tag, "dim": int(gf.shape[1])}
        metrics = measure("distribution_metrics", rows, tag_m, compute_metrics, gf, rf, seed=0)
        rows[-1]["fid"] = round(metrics[FID], 4)
        if bootstrap:
            measure(
                f"distribution_metrics_bootstrap{bootstrap}",
                rows,
                tag_m,
                compute_metrics,
                gf,
                rf,
                num_bootstrap=bootstrap,
                seed=0,
            )
        # Memorization works on pixels, not features: once per image shape is enough.
        if memorization and (size, channels) not in shapes_done:
            shapes_done.add((size, channels))
            measure("memorization", rows, {**tag, "features": "(pixels)"}, memorization_report, gen.images, ref.images)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--bootstrap", type=int, default=0)
    parser.add_argument("--no-memorization", action="store_true")
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma list of SIZExCHANNELS:FEATURES",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: library default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    configs = []
    for item in args.configs.split(","):
        shape, features = item.split(":")
        size, channels = shape.split("x")
        configs.append((int(size), int(channels), features))
    import torch
    from threadpoolctl import threadpool_limits

    if args.threads:
        torch.set_num_threads(args.threads)
    env = {
        "torch_threads": torch.get_num_threads(),
        "blas_threads": args.threads or "default",
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    print(json.dumps(env))
    with threadpool_limits(args.threads or None):
        rows = run(args.num_images, configs, args.bootstrap, not args.no_memorization)
    env["load_avg_end"] = os.getloadavg()[0]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"env": env, "rows": rows}, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
