"""The training loop: AdamW, EMA, warm-up, gradient clipping, atomic checkpoints, exact resume, progress.

Reproducibility: step ``s`` draws its batch, timesteps, noise and label dropout from a generator seeded by
``(seed, s)``, and its images from a per-epoch permutation seeded by ``(seed, epoch)``. Nothing depends on
process history, so a run resumed from its last checkpoint ends exactly where an uninterrupted one does: same
weights bit for bit, and the same ``metrics.jsonl`` rows (apart from the measured ``images_per_s``), because a
resume drops the rows logged after its checkpoint and the checkpoint carries the partial loss average.

Crash safety: a checkpoint is assembled in ``checkpoints/.tmp-*`` and renamed into place before ``latest.json``
points at it; the final model is swapped in by :func:`diffaudit.models.checkpoint.save_model`. A kill at any
instant leaves a resumable run; resuming removes the killed run's temporary files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffaudit.config import Preset, validate_preset
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import CheckpointError, ConfigError, DiffauditError
from diffaudit.io import atomic_write_json, crash_point, fsync_dir, read_json
from diffaudit.models.checkpoint import load_model, recover_model_dir, save_model
from diffaudit.models.diffusion import DiffusionModel
from diffaudit.models.ema import EMA
from diffaudit.progress import progress_bar
from diffaudit.runs import RunDir
from diffaudit.safeload import load_safetensors

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
KEEP_CHECKPOINTS = 2


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the images in step ``step``'s batch: consecutive slices of per-epoch seeded permutations."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        mask = epochs == epoch
        out[mask] = perm[offsets[mask]]
    return out


def check_compatible(model: DiffusionModel, data: ImageSet) -> None:
    """Raise a ConfigError when ``data``'s image shape or classes do not fit ``model``."""
    cfg = model.config
    if data.shape != (cfg.channels, cfg.resolution, cfg.resolution):
        raise ConfigError(
            f"data images are {data.shape} (C, H, W) but the model expects "
            f"({cfg.channels}, {cfg.resolution}, {cfg.resolution}); set data.resolution / data.channels"
        )
    if cfg.conditional and data.labels.max(initial=-1) >= cfg.num_classes:
        raise ConfigError(f"data has label {data.labels.max()} but the model has {cfg.num_classes} classes")


def model_config_for(preset: Preset, data: ImageSet):
    """The preset's model config with the number of classes taken from the data (0 when unlabelled)."""
    num_classes = data.num_classes if data.is_labelled else 0
    return dataclasses.replace(preset.model, num_classes=num_classes)


# ---- checkpoints ------------------------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = opt.state_dict()
    tensors = {
        f"{pid}.{name}": value.detach().cpu().contiguous()
        for pid, pstate in state["state"].items()
        for name, value in pstate.items()
    }
    return tensors, state["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    run: RunDir,
    step: int,
    model: DiffusionModel,
    ema: EMA,
    opt: torch.optim.Optimizer,
    loss_acc: tuple[float, int] = (0.0, 0),
) -> Path:
    """Write ``checkpoints/step-XXXXXXX`` atomically, point ``latest.json`` at it, prune older ones.

    ``loss_acc`` is the (sum, count) of losses since the last metrics row: a resumed run continues the average.
    ``state.json`` is written last, so a step directory holding it is complete.
    """
    root = run.file(CHECKPOINTS)
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    save_model(model, tmp / "model", ema_state=ema.state_dict())
    tensors, groups = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "param_groups": groups, "loss_sum": loss_acc[0], "loss_count": loss_acc[1]}
    atomic_write_json(tmp / "state.json", state)
    crash_point("checkpoint:tmp-written")
    aside = root / f".old-{final.name}"
    if final.exists():  # only when a finished run is resumed again: keep it until the new one is in place
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(root)
    crash_point("checkpoint:moved")
    atomic_write_json(root / LATEST, {"step": step, "path": final.name})
    crash_point("checkpoint:latest-written")
    if aside.exists():
        shutil.rmtree(aside)
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_dir(root: Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest.json`` names, else the newest complete one."""
    latest = read_json(root / LATEST, "checkpoint pointer", CheckpointError) if (root / LATEST).exists() else {}
    name = latest.get("path") if isinstance(latest, dict) else None
    if isinstance(name, str) and "/" not in name and name.startswith("step-"):
        for candidate in (root / name, root / f".old-{name}"):
            if (candidate / "state.json").is_file():
                return candidate
    complete = sorted(d for d in root.glob("step-*") if (d / "state.json").is_file())
    return complete[-1] if complete else None


def load_checkpoint(
    run: RunDir, model: DiffusionModel, ema: EMA, opt: torch.optim.Optimizer
) -> tuple[int, tuple[float, int]]:
    """Restore the latest checkpoint of ``run``; returns (completed steps, loss accumulator) ((0, (0, 0)): none)."""
    root = run.file(CHECKPOINTS)
    ckpt = _checkpoint_dir(root) if root.is_dir() else None
    if ckpt is None:
        return 0, (0.0, 0)
    try:
        meta = read_json(ckpt / "state.json", "checkpoint state", CheckpointError)
        model.unet.load_state_dict(load_safetensors(ckpt / "model" / "model.safetensors"))
        ema.load_state_dict(load_safetensors(ckpt / "model" / "ema.safetensors"))
        _load_optimizer(opt, load_safetensors(ckpt / "optimizer.safetensors"), meta["param_groups"])
        step = int(meta["step"])
        acc = (float(meta.get("loss_sum", 0.0)), int(meta.get("loss_count", 0)))
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, DiffauditError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{ckpt}: cannot resume from this checkpoint ({first})") from exc
    return step, acc


# ---- the loop ---------------------------------------------------------------------------------------------
def _lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / max(1, warmup))


#: Condition randomisation draws from ``(seed, step, RANDOM_COND_STREAM)``: a stream of its own, so switching it on
#: leaves the batch, timesteps, noise and label dropout of every step unchanged.
RANDOM_COND_STREAM = 0x5A11


def randomize_labels(labels: torch.Tensor, num_classes: int, prob: float, seed: int, step: int) -> torch.Tensor:
    """Somepalli et al. (2023)'s condition randomisation: each label becomes a uniform random class w.p. ``prob``.

    ``labels`` ``int64 (B,)``; the replacement may equal the original class (uniform over all ``num_classes``).
    Draws depend only on ``(seed, step)``, so a resumed run makes the same replacements.
    """
    if prob <= 0 or num_classes < 1:
        return labels
    rng = np.random.default_rng([seed, step, RANDOM_COND_STREAM])
    replace = torch.from_numpy(rng.random(len(labels)) < prob).to(labels.device)
    random = torch.from_numpy(rng.integers(0, num_classes, len(labels))).to(labels)
    return torch.where(replace & (labels >= 0), random, labels)


def _dp_loss_and_grads(
    model: DiffusionModel,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    gen: torch.Generator,
    tcfg,
    dp: dict,
    step: int,
) -> tuple[torch.Tensor, float]:
    """One DP-SGD step's gradients (set on the parameters) with the same draws as :meth:`DiffusionModel.loss`."""
    from diffaudit.dp import DP_NOISE_STREAM, private_gradients

    t, noise, labels = model.draw_step(x0, labels, gen, tcfg.cond_drop_prob)
    noise_gen = torch.Generator().manual_seed(_step_seed(tcfg.seed, step) ^ DP_NOISE_STREAM)
    loss, clipped = private_gradients(model, x0, labels, t, noise, tcfg.dp_clip, dp["noise_multiplier"], noise_gen)
    return torch.tensor(loss), clipped


def _dp_setup(tcfg, n_train: int, distributed: bool) -> dict | None:
    """DP-SGD settings (noise multiplier for the target epsilon) or None when ``train.dp_epsilon`` is unset."""
    if tcfg.dp_epsilon is None:
        return None
    from diffaudit.dp import check_dp_settings, noise_multiplier_for

    if distributed:
        raise ConfigError("train.dp_epsilon is not supported in data-parallel training (run on one process)")
    check_dp_settings(float(tcfg.dp_epsilon), tcfg.dp_delta, n_train)
    rate = min(1.0, tcfg.batch_size / n_train)
    sigma = noise_multiplier_for(float(tcfg.dp_epsilon), tcfg.dp_delta, rate, tcfg.steps)
    return {
        "target_epsilon": float(tcfg.dp_epsilon),
        "delta": tcfg.dp_delta,
        "clip": tcfg.dp_clip,
        "sample_rate": rate,
        "noise_multiplier": sigma,
        "accountant": "rdp (opacus); fixed-size shuffled batches treated as Poisson sampling at rate B/N",
    }


def train(
    preset: Preset,
    data: ImageSet,
    run: RunDir,
    init: str | os.PathLike[str] | None = None,
    callback: Callable[[int, float], None] | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> str:
    """Train (or fine-tune from ``init``) a diffusion model on ``data``; returns the final model id.

    Writes ``RUN/model`` (final weights + EMA), periodic checkpoints and ``metrics.jsonl`` rows
    ``{"step", "loss", "lr", "images_per_s"}``. With ``run.resume`` it continues from the last checkpoint.
    ``callback(step, loss)`` is called after every step (tests use it to simulate a crash). ``device``
    defaults to :func:`diffaudit.device.resolve_device` (a GPU when torch sees one); batches, timesteps
    and noise are drawn on the CPU either way, so a seed selects the same training run on every device.
    """
    from diffaudit.device import describe_device, resolve_device
    from diffaudit.scale import ddp

    # Under torchrun / accelerate launch: one rank of a data-parallel job (see diffaudit.scale.ddp); else None.
    dist_ctx, dev = ddp.init_distributed(resolve_device(device))
    writer = dist_ctx is None or dist_ctx.is_writer
    if dist_ctx is not None:
        ddp.barrier()  # rank 0 has opened (on resume: cleaned) the run before any rank reads its checkpoint
    validate_preset(preset)
    tcfg = preset.train
    torch.manual_seed(tcfg.seed)  # only parameter initialisation uses the global generator
    if init is not None:
        model, init_meta = load_model(init, use_ema=True, device=dev)
        model.train()
    else:
        model, init_meta = DiffusionModel(model_config_for(preset, data)).to(dev), None
    check_compatible(model, data)
    run.update_manifest(device=describe_device(dev))
    if dist_ctx is not None:
        run.update_manifest(
            data_parallel={"world_size": dist_ctx.world, "backend": "nccl" if dev.type == "cuda" else "gloo"}
        )
    ema = EMA(model.unet, tcfg.ema_decay)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start, (loss_sum, loss_count) = load_checkpoint(run, model, ema, opt) if run.resume else (0, (0.0, 0))
    if run.resume:
        # Rows after the checkpoint are logged again below; a killed final save is finished or undone.
        run.truncate_metrics(start)
        if writer:
            recover_model_dir(run.file("model"))
    model.train()

    images = data.to_model_tensor().to(dev)
    labels = torch.from_numpy(data.labels).to(dev) if model.config.conditional else None
    dp = _dp_setup(tcfg, len(data), dist_ctx is not None)
    if dp is not None:
        run.update_manifest(dp=dp)
    t_last, n_since = time.perf_counter(), 0
    with progress_bar(
        f"train {run.path.name}", total=tcfg.steps, completed=start, enabled=show_progress and writer
    ) as bar:
        for step in range(start, tcfg.steps):
            gen = torch.Generator().manual_seed(_step_seed(tcfg.seed, step))
            idx = torch.from_numpy(batch_indices(len(data), tcfg.batch_size, step, tcfg.seed)).to(dev)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, tcfg.lr, tcfg.warmup_steps)
            batch_labels = None if labels is None else labels[idx]
            if batch_labels is not None and tcfg.cond_random_prob > 0:
                batch_labels = randomize_labels(
                    batch_labels, model.config.num_classes, tcfg.cond_random_prob, tcfg.seed, step
                )
            dp_clipped = None
            if dp is not None:
                opt.zero_grad(set_to_none=True)
                loss, dp_clipped = _dp_loss_and_grads(model, images[idx], batch_labels, gen, tcfg, dp, step)
            elif dist_ctx is None:
                loss = model.loss(images[idx], batch_labels, gen, tcfg.cond_drop_prob)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:  # this rank's slice of the global batch; gradients summed over ranks = one process's
                loss, slice_sum = ddp.global_batch_loss(
                    model, images[idx], batch_labels, gen, tcfg.cond_drop_prob, dist_ctx
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                ddp.allreduce_gradients(list(model.unet.parameters()))
                loss = torch.tensor(ddp.allreduce_sum(slice_sum) / tcfg.batch_size)
            if tcfg.grad_clip > 0 and dp is None:  # DP-SGD clips per sample instead
                torch.nn.utils.clip_grad_norm_(model.unet.parameters(), tcfg.grad_clip)
            opt.step()
            ema.update(model.unet, step)
            loss_value = float(loss.detach())
            loss_sum, loss_count, n_since = loss_sum + loss_value, loss_count + 1, n_since + tcfg.batch_size
            done = step + 1
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                elapsed = time.perf_counter() - t_last
                rate = n_since / elapsed if elapsed > 0 else float("nan")
                row = {
                    "step": done,
                    "loss": loss_sum / loss_count,
                    "lr": opt.param_groups[0]["lr"],
                    "images_per_s": rate,
                }
                if dp is not None:
                    from diffaudit.dp import epsilon_spent

                    row["dp_epsilon"] = epsilon_spent(dp["noise_multiplier"], dp["sample_rate"], done, dp["delta"])
                    row["dp_clipped_share"] = dp_clipped
                run.log(row)
                bar.update(completed=done, info=f"loss {loss_sum / loss_count:.4f}  {rate:.0f} img/s")
                t_last, n_since, loss_sum, loss_count = time.perf_counter(), 0, 0.0, 0
            else:
                bar.update(completed=done)
            if writer and done % tcfg.checkpoint_every == 0 and done < tcfg.steps:
                save_checkpoint(run, done, model, ema, opt, (loss_sum, loss_count))
            crash_point(f"train:step-{done}")
            if callback is not None:
                callback(done, loss_value)
    if not writer:  # rank 0 saves; the others wait for it and return its model id
        model_id = ddp.broadcast_str(None)
        ddp.barrier()
        return model_id
    model_id = save_model(
        model,
        run.file("model"),
        ema_state=ema.state_dict(),
        extra={
            "class_names": list(data.class_names),
            "preset": preset.name,
            "trained_steps": tcfg.steps,
            "train_images": len(data),
            "init_model_id": init_meta.get("model_id") if init_meta else None,
        },
    )
    save_checkpoint(run, tcfg.steps, model, ema, opt)
    run.update_manifest(model_id=model_id)
    if dp is not None:
        from diffaudit.dp import epsilon_spent

        spent = epsilon_spent(dp["noise_multiplier"], dp["sample_rate"], tcfg.steps, dp["delta"])
        run.update_manifest(dp=dp | {"epsilon_spent": spent})
    if dist_ctx is not None:
        ddp.broadcast_str(model_id)
        ddp.barrier()
    return model_id
