"""Target and shadow models for membership inference, and the end-to-end attack run.

Carlini et al. (2023, Sec. 5) train every model on a random half of a candidate pool, so each model is a
shadow for the others. Here model 0 is the target (unless the user brings one) and models 1..K are shadows.
Each model trains in its own run sub-directory ``RUN/models/<name>``; a finished model is never retrained
and its losses are cached next to it (``mia-losses.npz``, keyed by everything that determines them).

The timestep is chosen on a held-out *selection* split of the candidates (AUC on that split, per attack);
the reported numbers use only the remaining *evaluation* split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffaudit.attacks import mia, roc
from diffaudit.config import Preset
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.io import atomic_path, atomic_write_json
from diffaudit.models.checkpoint import load_model
from diffaudit.runs import RunDir, read_manifest

LOSSES_FILE = "mia-losses.npz"
RESULTS_FILE = "results.json"
SCORES_FILE = "scores.json"
MATRIX_FILE = "membership.npz"
ROC_FILE = "roc.png"


@dataclass(frozen=True)
class MiaConfig:
    """Settings of one membership-inference run (all recorded in the run's config.json)."""

    num_shadows: int = 8
    timesteps: tuple[int, ...] = mia.DEFAULT_TIMESTEPS
    noise_draws: int = 20
    flip: bool = False
    pool_size: int | None = None
    selection_fraction: float = 0.3
    fix_variance: bool = True
    seed: int = 0
    batch_size: int = 512

    def validate(self) -> None:
        if self.num_shadows < 0 or self.num_shadows == 1:
            raise ConfigError(f"num_shadows must be 0 (loss threshold only) or >= 2, got {self.num_shadows}")
        if not self.timesteps:
            raise ConfigError("give at least one timestep")
        if self.noise_draws < 1:
            raise ConfigError(f"noise_draws must be >= 1, got {self.noise_draws}")
        if not 0.0 < self.selection_fraction < 1.0:
            raise ConfigError(f"selection_fraction must be in (0, 1), got {self.selection_fraction}")


# ---- pool and membership --------------------------------------------------------------------------------------
def prepare_pool(data: ImageSet, pool_size: int | None, seed: int) -> tuple[ImageSet, dict[str, int]]:
    """Deduplicate ``data`` by content id (a duplicate could be IN and OUT at once) and draw ``pool_size``."""
    _, first = np.unique(data.ids, return_index=True)
    first = np.sort(first)
    info = {"source_images": len(data), "duplicates_removed": len(data) - len(first)}
    if pool_size is not None:
        if not 4 <= pool_size <= len(first):
            raise ConfigError(f"pool_size {pool_size} must be in [4, {len(first)}] (unique images in the data)")
        first = np.sort(np.random.default_rng([seed, 7]).choice(first, size=pool_size, replace=False))
    info["pool_size"] = len(first)
    return data.subset(first), info


def random_halves(num_samples: int, num_models: int, seed: int) -> np.ndarray:
    """Membership matrix ``bool (num_models, num_samples)``: model ``m`` trains on a seeded random half."""
    out = np.zeros((num_models, num_samples), dtype=bool)
    for m in range(num_models):
        out[m, np.random.default_rng([seed, 11, m]).permutation(num_samples)[: num_samples // 2]] = True
    return out


def selection_mask(num_samples: int, fraction: float, seed: int) -> np.ndarray:
    """``bool (N,)``: the candidates used only to choose the timestep (never in reported numbers)."""
    mask = np.zeros(num_samples, dtype=bool)
    mask[np.random.default_rng([seed, 13]).permutation(num_samples)[: round(num_samples * fraction)]] = True
    return mask


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


# ---- models ---------------------------------------------------------------------------------------------------
def train_member_model(
    preset: Preset, pool: ImageSet, members: np.ndarray, path: Path, train_seed: int, show_progress: bool = True
) -> tuple[Path, bool]:
    """Train (or resume, or reuse when finished) a model on ``pool[members]`` in run directory ``path``.

    Returns the run directory and whether training ran in this call.
    """
    from diffaudit.train import train

    path = Path(path)
    done = (path / "model" / "config.json").exists() and (path / "manifest.json").exists()
    if done and read_manifest(path).get("status") == "finished":
        return path, False
    cfg = dataclasses.replace(preset, train=dataclasses.replace(preset.train, seed=train_seed))
    subset = pool.subset(members)
    with RunDir(path, kind="train", resume=True) as run:
        run.write_config(
            cfg.to_dict() | {"members_digest": _digest(sorted(subset.ids.tolist())), "num_members": len(subset)}
        )
        train(cfg, subset, run, show_progress=show_progress)
    return path, True


def cached_losses(
    model_dir: Path, pool: ImageSet, mcfg: MiaConfig, cache: Path, show_progress: bool = True
) -> tuple[np.ndarray, str]:
    """Losses ``float32 (N, T, V)`` of ``pool`` under the model in ``model_dir`` and its model id.

    Cached in ``cache`` (an ``.npz`` keyed by model id, candidate ids, timesteps, draws, flip and seed).
    """
    model, meta = load_model(model_dir)
    model_id = str(meta["model_id"])
    key = _digest(model_id, pool.ids.tolist(), list(mcfg.timesteps), mcfg.noise_draws, mcfg.flip, mcfg.seed)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return z["losses"], model_id
    losses = mia.sample_losses(
        model, pool, mcfg.timesteps, mcfg.noise_draws, mcfg.flip, mcfg.seed, mcfg.batch_size, show_progress
    )
    with atomic_path(cache, suffix=".npz") as tmp:
        np.savez(tmp, key=np.array(key), losses=losses)
    return losses, model_id


# ---- the attack run -------------------------------------------------------------------------------------------
def evaluate_attacks(
    target_stat: np.ndarray,
    shadow_stats: np.ndarray | None,
    shadow_membership: np.ndarray | None,
    target_members: np.ndarray,
    selection: np.ndarray,
    timesteps: tuple[int, ...],
    fix_variance: bool = True,
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Choose ``t`` per attack on the selection split and report on the evaluation split.

    ``target_stat`` ``(N, T)``, ``shadow_stats`` ``(N, K, T)`` (or None: loss threshold only), membership
    ``bool (K, N)``, ``target_members`` and ``selection`` ``bool (N,)``. Returns the results dict and the
    chosen-``t`` scores per attack ``{name: (N,)}``.
    """
    attacks = [mia.LOSS] if shadow_stats is None else list(mia.ATTACKS)
    evaluation = ~selection
    for split, mask in (("selection", selection), ("evaluation", evaluation)):
        if target_members[mask].all() or not target_members[mask].any():
            raise DataError(f"the {split} split needs both members and non-members; use a larger pool")
    results: dict[str, object] = {"attacks": {}, "sweep": {}}
    chosen: dict[str, np.ndarray] = {}
    for name in attacks:
        per_t, auc_sel = [], {}
        for j, t in enumerate(timesteps):
            s_stats = None if shadow_stats is None else shadow_stats[:, :, j]
            scores, info = mia.attack_scores(name, target_stat[:, j], s_stats, shadow_membership, fix_variance)
            per_t.append((scores, info))
            auc_sel[int(t)] = roc.summarize(scores[selection], target_members[selection])[roc.AUC]
            sweep = roc.summarize(scores[evaluation], target_members[evaluation])
            results["sweep"].setdefault(str(int(t)), {})[name] = {k: sweep[k] for k in (roc.AUC, roc.TPR_AT_1PCT)}
        # Ties go to the earlier timestep in the given order.
        best = max(range(len(timesteps)), key=lambda j: (auc_sel[int(timesteps[j])], -j))
        scores, info = per_t[best]
        chosen[name] = scores
        results["attacks"][name] = {
            "t": int(timesteps[best]),
            "selection_auc_by_t": auc_sel,
            **roc.summarize(scores[evaluation], target_members[evaluation]),
            **({"fallbacks": info} if info else {}),
        }
    return results, chosen


def run_mia(
    preset: Preset,
    data: ImageSet,
    run: RunDir,
    mcfg: MiaConfig,
    target: Path | None = None,
    target_member_ids: set[str] | None = None,
    show_progress: bool = True,
) -> dict[str, object]:
    """Train target and shadows as needed, compute losses, attack, and write results into ``run``.

    Without ``target`` the target is model 0, trained on its own random half of the pool. With ``target``
    (a model directory) its members are ``target_member_ids`` (content ids). Writes ``results.json``,
    ``scores.json`` (per sample, by id), ``membership.npz`` and ``roc.png``; returns the results dict.
    """
    mcfg.validate()
    t0 = time.perf_counter()
    pool, pool_info = prepare_pool(data, mcfg.pool_size, mcfg.seed)
    n = len(pool)
    if target is None:
        matrix = random_halves(n, mcfg.num_shadows + 1, mcfg.seed)
        target_members, shadow_membership = matrix[0], matrix[1:]
    else:
        if target_member_ids is None:
            raise ConfigError("a user-supplied target needs the ids of its members")
        target_members = np.isin(pool.ids, sorted(target_member_ids))
        shadow_membership = random_halves(n, mcfg.num_shadows, mcfg.seed)
    selection = selection_mask(n, mcfg.selection_fraction, mcfg.seed)
    models_dir = run.file("models")
    trained: dict[str, bool] = {}

    def model_losses(name: str, members: np.ndarray, index: int) -> tuple[np.ndarray, str]:
        path, ran = train_member_model(
            preset, pool, members, models_dir / name, preset.train.seed + 1000 * mcfg.seed + index, show_progress
        )
        trained[name] = ran
        return cached_losses(path / "model", pool, mcfg, path / LOSSES_FILE, show_progress)

    if target is None:
        target_losses, target_id = model_losses("target", target_members, 0)
    else:
        target_losses, target_id = cached_losses(
            Path(target), pool, mcfg, run.file("target-" + LOSSES_FILE), show_progress
        )
    shadow_losses = [model_losses(f"shadow-{k:02d}", shadow_membership[k], k + 1) for k in range(mcfg.num_shadows)]

    target_stat = mia.loss_statistic(target_losses)  # (N, T)
    shadow_stats = (
        np.stack([mia.loss_statistic(sl) for sl, _ in shadow_losses], axis=1) if shadow_losses else None
    )  # (N, K, T)
    results, chosen = evaluate_attacks(
        target_stat,
        shadow_stats,
        shadow_membership if shadow_losses else None,
        target_members,
        selection,
        tuple(mcfg.timesteps),
        mcfg.fix_variance,
    )
    evaluation = ~selection
    results.update(
        pool=pool_info | {"selection": int(selection.sum()), "evaluation": int(evaluation.sum())},
        target={"model_id": target_id, "members": int(target_members.sum()), "user_supplied": target is not None},
        shadows={"num": mcfg.num_shadows, "model_ids": [mid for _, mid in shadow_losses], "trained_now": trained},
        timesteps=list(mcfg.timesteps),
        seconds=time.perf_counter() - t0,
    )
    atomic_write_json(run.file(RESULTS_FILE), results)
    j_of = {int(t): j for j, t in enumerate(mcfg.timesteps)}
    rows = []
    for i in range(n):
        row: dict[str, object] = {
            "id": str(pool.ids[i]),
            "label": int(pool.labels[i]),
            "member": bool(target_members[i]),
            "split": "selection" if selection[i] else "evaluation",
        }
        for name, scores in chosen.items():
            row[f"score_{name}"] = float(scores[i])
        for t, j in j_of.items():
            row[f"loss_t{t}"] = float(target_losses[i, j].mean())
        rows.append(row)
    atomic_write_json(run.file(SCORES_FILE), rows)
    with atomic_path(run.file(MATRIX_FILE), suffix=".npz") as tmp:
        np.savez(
            tmp,
            ids=pool.ids,
            target_membership=target_members,
            shadow_membership=shadow_membership,  # (models, samples)
            target_losses=target_losses,  # (samples, timesteps, variants)
            shadow_stats=shadow_stats if shadow_stats is not None else np.zeros((n, 0, len(mcfg.timesteps))),
            timesteps=np.asarray(mcfg.timesteps),
            selection=selection,
        )
    roc.plot_roc(
        roc.curves_for({k: v[evaluation] for k, v in chosen.items()}, target_members[evaluation]),
        run.file(ROC_FILE),
        title=f"MIA, {int(evaluation.sum())} evaluation candidates, K={mcfg.num_shadows}",
    )
    for name, summary in results["attacks"].items():
        run.log({"attack": name, **{k: summary[k] for k in ("t", roc.AUC, roc.TPR_AT_1PCT, roc.TPR_AT_01PCT)}})
    return results
