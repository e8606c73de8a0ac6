"""Data-parallel training under ``torchrun`` / ``accelerate launch --multi_gpu``: same run as one process.

Every rank holds the whole model and draws the *global* batch's randomness from the ``(seed, step)`` stream
(indices, timesteps, noise, label dropout: exactly what one process draws), then computes the loss of its own
slice ``[r*B//W, (r+1)*B//W)``, scaled so that the gradients summed over ranks are the gradient of the mean
over the global batch. One all-reduce per step (a flat buffer of every gradient) replaces torch's
``DistributedDataParallel`` wrapper: the module (and so its saved state dict) stays unwrapped, and every rank
then takes the same AdamW and EMA step. Only rank 0 writes (run directory, checkpoints, metrics, model); the
other ranks see the run through a read-only :class:`RankView`, enough to resume from its checkpoint.

Results equal a one-process run up to float summation order (a few 1e-6 of the loss; tested on weights after
10 AdamW steps within 1e-4).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel job."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (contiguous; sizes differ by at most one)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


def world_from_env() -> DistContext | None:
    """The job torchrun/Accelerate started (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); ``None`` for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    return DistContext(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))))


def init_distributed(device: torch.device) -> tuple[DistContext | None, torch.device]:
    """Join the job's process group (NCCL on GPUs, gloo on CPUs); each rank gets GPU ``LOCAL_RANK``."""
    ctx = world_from_env()
    if ctx is None:
        return None, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def global_batch_loss(
    model: Any,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    cond_drop_prob: float,
    ctx: DistContext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of :meth:`DiffusionModel.loss` over the global batch ``x0`` ``(B, C, H, W)``.

    Draws timesteps, noise and dropout for all ``B`` rows with :meth:`DiffusionModel.draw_step` (as the loss
    does), then returns ``(to_backward, slice_sum)``: ``slice_sum / B`` scaled so
    that summing gradients over ranks gives the gradient of the global mean, and the detached sum of this
    slice's per-sample losses (all-reduced by the caller for logging).
    """
    n = x0.shape[0]
    t, noise, labels = model.draw_step(x0, labels, generator, cond_drop_prob)
    rows = ctx.slice(n)
    per = model.per_sample_loss(x0[rows], None if labels is None else labels[rows], t[rows], noise[rows])
    total = per.sum()
    return total / n, total.detach()


def allreduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every gradient over ranks with one all-reduce (missing gradients count as zeros on every rank)."""
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_sum(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return float(value)


def broadcast_str(text: str | None) -> str:
    """Rank 0's ``text`` on every rank (the model id only rank 0 computed)."""
    import torch.distributed as dist

    box = [text]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


class RankView:
    """A run directory as a non-writing rank sees it: paths to read checkpoints from; every write a no-op."""

    def __init__(self, path: str | os.PathLike[str], resume: bool) -> None:
        self.path = Path(path)
        self.resume = resume
        self.kind = "train"

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict[str, Any]) -> None:
        pass

    def update_manifest(self, **fields: Any) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        pass

    def truncate_metrics(self, last_step: int) -> None:
        pass


@contextlib.contextmanager
def open_train_run(out: str | os.PathLike[str], resume: bool) -> Iterator[Any]:
    """The run to train into: a locked :class:`~diffaudit.runs.RunDir` on rank 0 (or alone), a RankView elsewhere.

    :func:`diffaudit.train.train` then joins the process group and waits for every rank (so rank 0 has opened,
    and on resume cleaned, the run before any rank reads its checkpoint).
    """
    from diffaudit.runs import RunDir

    ctx = world_from_env()
    if ctx is None:
        with RunDir(out, kind="train", resume=resume) as run:
            yield run
        return
    if ctx.is_writer:
        with RunDir(out, kind="train", resume=resume) as run:
            yield run
    else:
        yield RankView(out, resume)
