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
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diffaudit import distances
from diffaudit.distances import _engine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _int8_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return ", ".join(f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in flags) or "none"


def _probe_rows(args: argparse.Namespace, skip: set[str]) -> str:
    """Peak resident memory added by diffaudit's call in each row, each in a fresh process."""
    cells = []
    for row in ROWS:
        if row in skip:
            continue
        others = ",".join(r for r in ROWS if r != row)
        cmd = [sys.executable, __file__, "--memory-probe", "--skip", others, "--threads", str(args.threads)]
        cmd += ["--fast-pass", args.fast_pass, "--tiled-n", str(args.tiled_n), "--nn-q", str(args.nn_q)]
        cmd += ["--nn-r", str(args.nn_r), "--feat-n", str(args.feat_n), "--img-q", str(args.img_q)]
        cmd += ["--img-r", str(args.img_r)] + (["--sd-scale"] if args.sd_scale else [])
        # Every allocation of 1 MiB or more mapped on its own and returned on free: otherwise glibc may keep the
        # warm-up call's pages (the reading then ranged 0.3-1,373 MiB for one row) or grow its arenas.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        cells.append(f"{row} {out.split('PEAK_MIB')[1].split()[0]} MiB")
    return ", ".join(cells)


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


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_mib(fn: Callable[[], object]) -> float:
    """MiB of resident memory one call adds at its peak: VmHWM (reset just before) minus VmRSS before."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark VmHWM (Linux)
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


# Set by --memory-probe: the first row's diffaudit call is measured for memory, printed, and the process exits
# (a fresh process per row, so the allocator holds nothing from earlier rows or baselines).
_PROBE = False
ROWS = ("tiled", "tiled512", "nn", "adaptive", "feat", "img")


def _time(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    if _PROBE:
        fns["diffaudit"]()  # warm: numba's compiled code and torch's thread pools are not the engine's memory
        print(f"PEAK_MIB {_peak_mib(fns['diffaudit']):.1f}", flush=True)
        sys.exit(0)
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
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: " + ",".join(ROWS))
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument(
        "--fast-pass",
        choices=("auto", "float32", "int8"),
        default="auto",
        help="diffaudit's fast pass for uint8 images: auto (int8 where this CPU's int8 matmul is faster)",
    )
    ap.add_argument("--memory", action="store_true", help="also measure diffaudit's peak memory per row")
    ap.add_argument(
        "--sd-scale",
        action="store_true",
        help="add the tiled-L2 scan of --tiled-n x 3x512x512 images (one prompt's generations at Stable Diffusion"
        " size; the baselines' float32 tiles take 1.6 GB at 500 images)",
    )
    ap.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global _PROBE
    _PROBE = args.memory_probe
    if args.fast_pass != "auto":
        _engine.INT8_FAST_PASS = args.fast_pass == "int8"
    try:
        import faiss  # optional dev dependency
    except ImportError:
        faiss = None
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    skip = set(filter(None, args.skip.split(",")))
    if not args.sd_scale:
        skip.add("tiled512")
    rows: list[str] = []

    def report(what: str, best: dict[str, float], err: str = "") -> None:
        base = {k: v for k, v in best.items() if k != "diffaudit"}
        fastest = min(base, key=base.get)
        cells = ", ".join(f"{k} {v:.3f} s" for k, v in best.items())
        rows.append(f"| {what} | {cells} | {base[fastest] / best['diffaudit']:.2f} (vs {fastest}) | {err} |")
        print(rows[-1], flush=True)

    def rel_err(got: np.ndarray, true: np.ndarray) -> str:
        return f"{np.abs(got[: len(true)] / true - 1).max():.1e}"

    for row, side in (("tiled", 64), ("tiled512", 512)):
        if row in skip:
            continue
        x = rng.integers(0, 256, (args.tiled_n, 3, side, side), dtype=np.uint8)
        x[1] = x[0]
        x[2] = x[0]
        x[2, 0, 0, 0] ^= 1  # a near-copy: one grey level on one value of one tile
        fns = {
            "diffaudit": lambda x=x: distances.pairwise_tiled_l2(x, x),
            "matmul": lambda x=x: mm_tiled(x),
            "cdist": lambda x=x: cdist_tiled(x),
        }
        best, outs = _time(fns, args.repeats)
        true = np.array([1 / 255 / np.sqrt(3 * side * side / 16)])
        errs = ", ".join(f"{k} {rel_err(np.atleast_1d(v[0, 2]), true)}" for k, v in outs.items())
        report(f"tiled L2 {args.tiled_n} x {args.tiled_n} (one set), 3x{side}x{side} uint8, 4x4 tiles", best, errs)
        del x, fns, outs

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
    int8 = _engine.INT8_FAST_PASS if _engine.INT8_FAST_PASS is not None else _engine._int8_matmul_is_faster()
    header = [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores, {args.threads} threads; shared with other jobs;"
        f" int8 matmul instructions: {_int8_flags()}",
        f"- torch {torch.__version__}, faiss {getattr(faiss, '__version__', 'absent')}, numpy {np.__version__}",
        f"- diffaudit's fast pass for uint8 images: {'int8' if int8 else 'float32'} (--fast-pass {args.fast_pass})",
        f"- load average at the end: {load}; best of {args.repeats} interleaved runs; peak RSS {peak:.0f} MiB",
    ]
    if args.memory:
        header.append(f"- diffaudit's peak memory per row (fresh process each): {_probe_rows(args, skip)}")
    header += [
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
