"""Query blocks in parallel on the CPU (internal).

Every blocked distance function is a loop over independent blocks of query rows. torch parallelises each
operation inside a block across its intra-op threads, which pays off for the matmul but not for the many
small selection and bookkeeping operations around it: with 2 threads the matmul ran 2.4x faster and the rest
not at all, so the engine fell behind a plain matmul + min (measured, ``docs/benchmarks_distances.md``). Here
the blocks themselves run on ``torch.get_num_threads()`` Python threads, each issuing single-threaded torch
operations (they release the GIL), so everything in a block scales with the cores.

Workers share the inputs, the converted reference set and the output arrays (each writes only its own rows);
scratch buffers are per thread (:class:`ThreadScratch`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch


def workers_for(device: torch.device, n_blocks: int) -> int:
    """How many threads run query blocks: 1 on CUDA (one stream does it) or with one block or one thread."""
    if device.type != "cpu" or n_blocks < 2:
        return 1
    return max(1, min(torch.get_num_threads(), n_blocks))


# Fewest query rows per block worth a thread of its own. Below this the per-operation overhead of small blocks
# outweighs the parallel gain (measured: 500 x 500 tiled L2 in 4 blocks of 125 rows on 2 threads took 2.3x
# longer than one block with torch's own 2 threads).
_MIN_ROWS_PER_BLOCK = 256


def balanced_block(n: int, block: int, device: torch.device, blocks_per_worker: int = 1) -> int:
    """A query block size at most ``block`` that splits ``n`` rows into a multiple of the worker count.

    Five blocks on two workers leave one worker idle for a fifth of the time; six smaller ones do not.
    ``blocks_per_worker`` > 1 evens out blocks of unequal work (the triangle of a symmetric matrix).
    """
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    per = threads * blocks_per_worker
    if threads < 2 or n < per * _MIN_ROWS_PER_BLOCK:
        return block
    n_blocks = math.ceil(math.ceil(n / block) / per) * per
    return max(1, math.ceil(n / n_blocks))


def run_blocks(starts: list[int], work: Callable[[int], Any], device: torch.device) -> None:
    """Call ``work(start)`` for every query block start, on parallel threads where :func:`workers_for` allows.

    While the threads run, torch's intra-op thread count is 1 (restored after): the parallelism is across
    blocks, and nested intra-op threads would oversubscribe the cores. An exception in any block is raised
    here after the running blocks finish.
    """
    workers = workers_for(device, len(starts))
    if workers < 2:
        for s in starts:
            work(s)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_pool(workers).submit(work, s) for s in starts]
        wait(futures)  # every block ends before this returns or raises (no stray writes after an error)
        for f in futures:
            f.result()  # re-raises the first failure, in block order
    finally:
        torch.set_num_threads(threads)


# One pool for the process, kept between calls: a fresh thread's first torch operations cost ~1.5 ms of
# set-up, which made a 1,000 x 1,000 feature search 5x slower on 2 threads than on 1 (measured).
_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads (made again when the count changes)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != workers:
            if _POOL is not None:
                _POOL[1].shutdown(wait=False)
            _POOL = (workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffaudit-dist"))
        return _POOL[1]


def _forget_pool() -> None:
    """A forked child inherits the pool object but not its threads."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


class ThreadScratch:
    """Scratch tensors made once per thread by ``make()`` (a fresh allocation per block costs page faults)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._local = threading.local()

    def get(self) -> Any:
        if not hasattr(self._local, "value"):
            self._local.value = self._make()
        return self._local.value
