"""Benchmark the distance engine against plain matmul, torch.cdist and faiss on the issue's five workloads.

Run: ``python benchmarks/bench_distances.py`` (prints a markdown table with the machine; ``--out`` also writes it).

Every row times diffaudit and each baseline on the same inputs in the same process, interleaved, best of
``--repeats`` (shared machines vary by tens of percent between runs; read ratios, not absolute seconds).
"ratio" is the fastest baseline's time divided by diffaudit's: >= 1.00 means diffaudit is at least as fast.
Baselines return the fast ``|a|^2 + |b|^2 - 2ab`` value; the "near-copy error" column gives the worst relative
error of the returned distance on planted one-grey-level near-copies (diffaudit's goal: <= 1e-6).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diffaudit import distances


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)


def mm_tiled(x: np.ndarray, grid: int = 4) -> np.ndarray:
    """Plain batched matmul tiled L2 of x against itself: convert, tile, norms, baddbmm, max over tiles."""
    n, c, h, w = x.shape
    t = torch.from_numpy(x).float().div_(255)
    tl = t.reshape(n, c, grid, h // grid, grid, w // grid).permute(2, 4, 0, 1, 3, 5).reshape(grid * grid, n, -1)
    nrm = (tl * tl).sum(-1)
    sq = torch.baddbmm(nrm[:, :, None] + nrm[:, None, :], tl, tl.transpose(1, 2), alpha=-2).amax(0)
    return sq.clamp_min_(0).div_(tl.shape[-1]).sqrt_().numpy()


def cdist_tiled(x: np.ndarray, grid: int = 4) -> np.ndarray:
    n, c, h, w = x.shape
    t = torch.from_numpy(x).float().div_(255)
    tl = t.reshape(n, c, grid, h // grid, grid, w // grid).permute(2, 4, 0, 1, 3, 5).reshape(grid * grid, n, -1)
    return (torch.cdist(tl, tl).amax(0) / tl.shape[-1] ** 0.5).numpy()


def mm_knn(q: np.ndarray, r: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Plain matmul k-NN over blocks of queries: addmm with the reference norms, then min / top-k."""
    rt = torch.from_numpy(r)
    rn = (rt * rt).sum(1)
    dist, idx = [], []
    for i0 in range(0, len(q), block):
        qt = torch.from_numpy(q[i0 : i0 + block])
        s = torch.addmm(rn[None, :], qt, rt.T, alpha=-2)
        if k == 1:
            v, i = s.min(1, keepdim=True)
        else:
            v, i = torch.topk(s, k, dim=1, largest=False)
        dist.append((v + (qt * qt).sum(1, keepdim=True)).clamp_min_(0).sqrt_())
        idx.append(i)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy()


def cdist_knn(q: np.ndarray, r: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    rt = torch.from_numpy(r)
    dist, idx = [], []
    for i0 in range(0, len(q), block):
        s = torch.cdist(torch.from_numpy(q[i0 : i0 + block]), rt)
        v, i = s.min(1, keepdim=True) if k == 1 else torch.topk(s, k, dim=1, largest=False)
        dist.append(v)
        idx.append(i)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy()


def faiss_knn(faiss: object, q: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatL2(q.shape[1])
    index.add(r)
    d2, i = index.search(q, k)
    return np.sqrt(np.clip(d2, 0, None)), i


def _time(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    best = dict.fromkeys(fns, float("inf"))
    outs: dict[str, object] = {}
    for _ in range(repeats):  # interleaved, so a burst of load on the shared machine hits every method
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outs


def _plant(q: np.ndarray, r: np.ndarray, n: int = 10) -> np.ndarray:
    """Make q[:n] copies of r[100:100+n] plus one grey level on one value; returns the true distances."""
    q[:n] = r[100 : 100 + n]
    first = q[:n].reshape(n, -1)
    first[:, 0] = np.where(first[:, 0] < 255, first[:, 0] + 1, first[:, 0] - 1)
    q[:n] = first.reshape(q[:n].shape)
    d = (q[:n].astype(np.float64) - r[100 : 100 + n]) / 255
    return np.sqrt((d.reshape(n, -1) ** 2).mean(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tiled-n", type=int, default=500)
    ap.add_argument("--nn-q", type=int, default=5000)
    ap.add_argument("--nn-r", type=int, default=10000)
    ap.add_argument("--feat-n", type=int, default=10000)
    ap.add_argument("--img-q", type=int, default=10000)
    ap.add_argument("--img-r", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: tiled,nn,adaptive,feat,img")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    try:
        import faiss  # optional dev dependency
    except ImportError:
        faiss = None
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    skip = set(filter(None, args.skip.split(",")))
    rows: list[str] = []

    def report(what: str, best: dict[str, float], err: str = "") -> None:
        base = {k: v for k, v in best.items() if k != "diffaudit"}
        fastest = min(base, key=base.get)
        cells = ", ".join(f"{k} {v:.3f} s" for k, v in best.items())
        rows.append(f"| {what} | {cells} | {base[fastest] / best['diffaudit']:.2f} (vs {fastest}) | {err} |")
        print(rows[-1], flush=True)

    def rel_err(got: np.ndarray, true: np.ndarray) -> str:
        return f"{np.abs(got[: len(true)] / true - 1).max():.1e}"

    if "tiled" not in skip:
        x = rng.integers(0, 256, (args.tiled_n, 3, 64, 64), dtype=np.uint8)
        x[1] = x[0]
        x[2] = x[0]
        x[2, 0, 0, 0] ^= 1  # a near-copy: one grey level on one value of one tile
        fns = {
            "diffaudit": lambda: distances.pairwise_tiled_l2(x, x),
            "matmul": lambda: mm_tiled(x),
            "cdist": lambda: cdist_tiled(x),
        }
        best, outs = _time(fns, args.repeats)
        true = np.array([1 / 255 / np.sqrt(768)])
        errs = ", ".join(f"{k} {rel_err(np.atleast_1d(v[0, 2]), true)}" for k, v in outs.items())
        report(f"tiled L2 {args.tiled_n} x {args.tiled_n} (one set), 3x64x64 uint8, 4x4 tiles", best, errs)

    q16 = rng.integers(0, 256, (args.nn_q, 1, 16, 16), dtype=np.uint8)
    r16 = rng.integers(0, 256, (args.nn_r, 1, 16, 16), dtype=np.uint8)
    true16 = _plant(q16, r16)
    qf16, rf16 = _flat(q16), _flat(r16)
    d16 = qf16.shape[1]
    for name, k in (("nn", 1), ("adaptive", 50)):
        if name in skip:
            continue

        def ratio(dist: np.ndarray) -> np.ndarray:  # Carlini's adaptive ratio, alpha 0.5, from the k distances
            return dist[:, 0] / (0.5 * dist.mean(1))

        post = (lambda d: d) if k == 1 else ratio
        fns = {
            "diffaudit": lambda k=k, post=post: post(distances.nearest_neighbors(q16, r16, k=k)[0]),
            "matmul": lambda k=k, post=post: post(mm_knn(qf16, rf16, k)[0] / np.sqrt(d16)),
            "cdist": lambda k=k, post=post: post(cdist_knn(qf16, rf16, k)[0] / np.sqrt(d16)),
        }
        if faiss is not None:
            fns["faiss"] = lambda k=k, post=post: post(faiss_knn(faiss, qf16, rf16, k)[0] / np.sqrt(d16))
        best, outs = _time(fns, args.repeats)
        err = ""
        if k == 1:
            err = ", ".join(f"{m} {rel_err(v[:, 0], true16)}" for m, v in outs.items())
        what = "nearest neighbour" if k == 1 else "adaptive ratio (alpha 0.5, n 50)"
        report(f"{what} {args.nn_q} x {args.nn_r}, 1x16x16 uint8", best, err)

    if "feat" not in skip:
        qf = rng.normal(size=(args.feat_n, 64)).astype(np.float32)
        rf = rng.normal(size=(args.feat_n, 64)).astype(np.float32)
        fns = {
            "diffaudit": lambda: distances.nearest_neighbors(qf, rf, k=1, metric="euclidean")[0],
            "matmul": lambda: mm_knn(qf, rf, 1)[0],
            "cdist": lambda: cdist_knn(qf, rf, 1)[0],
        }
        if faiss is not None:
            fns["faiss"] = lambda: faiss_knn(faiss, qf, rf, 1)[0]
        best, _ = _time(fns, args.repeats)
        report(f"kNN (k=1) {args.feat_n} x {args.feat_n}, 64-d float32 features", best)

    if "img" not in skip:
        qi = rng.integers(0, 256, (args.img_q, 3, 32, 32), dtype=np.uint8)
        ri = rng.integers(0, 256, (args.img_r, 3, 32, 32), dtype=np.uint8)
        true_i = _plant(qi, ri)
        qfi, rfi = _flat(qi), _flat(ri)
        s = np.sqrt(qfi.shape[1])
        fns = {
            "diffaudit": lambda: distances.nearest_neighbors(qi, ri, k=1)[0],
            "matmul": lambda: mm_knn(qfi, rfi, 1)[0] / s,
            "cdist": lambda: cdist_knn(qfi, rfi, 1)[0] / s,
        }
        if faiss is not None:
            fns["faiss"] = lambda: faiss_knn(faiss, qfi, rfi, 1)[0] / s
        best, outs = _time(fns, args.repeats)
        err = ", ".join(f"{m} {rel_err(v[:, 0], true_i)}" for m, v in outs.items())
        report(f"kNN (k=1) {args.img_q} x {args.img_r}, 3x32x32 uint8, normalized L2", best, err)

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores, {args.threads} threads; shared with other jobs",
        f"- torch {torch.__version__}, faiss {getattr(faiss, '__version__', 'absent')}, numpy {np.__version__}",
        f"- load average at the end: {load}; best of {args.repeats} interleaved runs; peak RSS {peak:.0f} MiB",
        "",
        "| workload | time (best) | ratio: fastest baseline / diffaudit | near-copy relative error |",
        "|---|---|---|---|",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
