"""The end-to-end membership-inference run over any generator: shards, merge, attack, outputs.

The timestep is chosen on a held-out *selection* split of the candidates (AUC on that split, per attack);
the reported numbers use only the remaining *evaluation* split.
"""

from __future__ import annotations

import time

import numpy as np

from diffaudit.attacks import mia, roc
from diffaudit.attacks.mia_queries import run_query_attacks
from diffaudit.attacks.shadow import (
    LOSSES_FILE,
    MODEL_SUBDIR,
    MiaConfig,
    MiaSetup,
    membership,
    merge_shards,
    run_shard,
    selection_mask,
    shard_name,
    target_losses,
)
from diffaudit.errors import DataError
from diffaudit.io import atomic_path, atomic_write_json
from diffaudit.runs import RunDir

RESULTS_FILE = "results.json"
SCORES_FILE = "scores.json"
MATRIX_FILE = "membership.npz"
ROC_FILE = "roc.png"
WEN_FILE = "wen.json"


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
    config: MiaConfig,
    setup: MiaSetup,
    run: RunDir,
    show_progress: bool = True,
    shards_done: tuple[dict[str, bool], float] | None = None,
) -> dict[str, object]:
    """Fit target and shadows as needed (one shard each), attack, and write the results into ``run``.

    ``shards_done``: ``({model name: fitted}, seconds)`` of shard processes whose losses were installed under
    ``run/models`` (a merged sharded run, :mod:`diffaudit.attacks.mia_shards`): reported as this run's.

    Writes ``results.json``, ``scores.json`` (per sample, by id), ``membership.npz`` (models x samples membership,
    samples x models statistics), ``roc.png`` and one ``metrics.jsonl`` row per attack; returns the results.
    """
    config.validate()
    t0 = time.perf_counter()
    pool, n = setup.pool, len(setup.pool)
    target_members, matrix = membership(config, setup)
    selection = selection_mask(n, config.selection_fraction, config.seed)
    evaluation = ~selection
    for split, mask in (("selection", selection), ("evaluation", evaluation)):
        if target_members[mask].all() or not target_members[mask].any():
            raise DataError(f"the {split} split needs both members and non-members; use a larger pool")
    models_dir = run.file("models")
    indices = ([0] if setup.target is None else []) + list(range(1, config.num_shadows + 1))
    trained: dict[str, bool] = {}
    paths = {}
    t_shards = time.perf_counter()
    for index in indices:
        paths[index], trained[shard_name(index)] = run_shard(config, setup, index, models_dir, show_progress)
    t_shards = time.perf_counter() - t_shards
    if shards_done is not None:  # the shards fitted the models; this process only found their losses
        trained, t_shards = {shard_name(i): bool(shards_done[0][shard_name(i)]) for i in indices}, shards_done[1]
    shadow_idx = list(range(1, config.num_shadows + 1))
    shadow_losses, shadow_ids = merge_shards([paths[i] for i in shadow_idx], pool.ids)  # (N, K, T, V)
    if setup.target is None:
        losses, (target_id,) = merge_shards([paths[0]], pool.ids)
        target_loss = losses[:, 0]
    else:
        target_loss = target_losses(config, setup, run.file("target-" + LOSSES_FILE), show_progress)
        target_id = setup.target.model_id
    shadow_membership = matrix[1:]
    target_stat = mia.loss_statistic(target_loss)  # (N, T)
    shadow_stats = mia.loss_statistic(shadow_losses) if shadow_ids else None  # (N, K, T)
    results, chosen = evaluate_attacks(
        target_stat,
        shadow_stats,
        shadow_membership if shadow_ids else None,
        target_members,
        selection,
        tuple(config.timesteps),
        config.fix_variance,
    )
    q_results, q_scores, q_costs, skipped = run_query_attacks(
        target_generator(setup, run),
        pool,
        target_members,
        selection,
        tuple(config.query_attacks),
        config.query_params(),
        config.seed,
        min(config.batch_size, 64),
    )
    results["attacks"].update(q_results)
    chosen.update(q_scores)
    variants = config.noise_draws * (2 if config.flip else 1)
    per_model = len(config.timesteps) * variants
    # Loss and LiRA share the shards (fitting and scoring every model): their seconds include training, and are
    # None when every shard was already done (resume).
    shard_sec = t_shards / n if any(trained.values()) else None
    costs: dict[str, dict[str, object]] = {}
    for name in results["attacks"]:
        if name in q_costs:
            costs[name] = q_costs[name]
        else:
            k = 0 if name == mia.LOSS else len(shadow_ids)
            costs[name] = {
                "queries_per_image": per_model * (k + 1),
                "shadow_models": k,
                "seconds_per_image": shard_sec,
                "seconds_include_training": True,
            }
    results.update(
        costs=costs,
        skipped=skipped,
        pool=setup.pool_info | {"selection": int(selection.sum()), "evaluation": int(evaluation.sum())},
        target={
            "model_id": target_id,
            "members": int(target_members.sum()),
            "user_supplied": setup.target is not None,
            "family": setup.trainer.family,
        },
        shadows={"num": config.num_shadows, "model_ids": shadow_ids, "trained_now": trained},
        timesteps=list(config.timesteps),
        seconds=time.perf_counter() - t0,
    )
    atomic_write_json(run.file(RESULTS_FILE), results)
    _write_outputs(run, config, setup, target_members, selection, target_loss, shadow_membership, shadow_stats, chosen)
    for name, summary in results["attacks"].items():
        run.log({"attack": name, **{k: summary[k] for k in ("t", roc.AUC, roc.TPR_AT_1PCT, roc.TPR_AT_01PCT)}})
    return results


def _write_outputs(
    run: RunDir,
    config: MiaConfig,
    setup: MiaSetup,
    target_members: np.ndarray,
    selection: np.ndarray,
    target_loss: np.ndarray,
    shadow_membership: np.ndarray,
    shadow_stats: np.ndarray | None,
    chosen: dict[str, np.ndarray],
) -> None:
    """``scores.json`` (one row per candidate), ``membership.npz`` and ``roc.png``."""
    pool, n = setup.pool, len(setup.pool)
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
        for j, t in enumerate(config.timesteps):
            row[f"loss_t{int(t)}"] = float(target_loss[i, j].mean())
        rows.append(row)
    atomic_write_json(run.file(SCORES_FILE), rows)
    with atomic_path(run.file(MATRIX_FILE), suffix=".npz") as tmp:
        np.savez(
            tmp,
            ids=pool.ids,
            target_membership=target_members,
            shadow_membership=shadow_membership,  # (models, samples)
            target_losses=target_loss,  # (samples, timesteps, variants)
            shadow_stats=shadow_stats if shadow_stats is not None else np.zeros((n, 0, len(config.timesteps))),
            timesteps=np.asarray(config.timesteps),
            selection=selection,
        )
    evaluation = ~selection
    roc.plot_roc(
        roc.curves_for({k: v[evaluation] for k, v in chosen.items()}, target_members[evaluation]),
        run.file(ROC_FILE),
        title=f"MIA, {int(evaluation.sum())} evaluation candidates, K={config.num_shadows}",
    )


def target_generator(setup: MiaSetup, run: RunDir):  # noqa: ANN201 (a Generator)
    """The attacked model: the user's, or model 0 as saved by its shard."""
    if setup.target is not None:
        return setup.target
    return setup.trainer.load(run.file("models") / shard_name(0) / MODEL_SUBDIR)


def run_wen(
    setup: MiaSetup,
    run: RunDir,
    num_seeds: int = 16,
    guidance_scale: float = 2.0,
    seed: int = 0,
    extract_run: str | None = None,
    show_progress: bool = True,
) -> dict[str, object] | None:
    """Wen et al.'s detector on the target (``wen.json``); None (and a manifest note) for an unconditional one.

    Conditions: ``setup.wen_conditions`` (e.g. a prompts file) when given, else the target's own (its classes,
    or the pool's captions for a pipeline).
    """
    from diffaudit.attacks.mia import align_conditions
    from diffaudit.detectors import wen

    gen = align_conditions(target_generator(setup, run), setup.pool)
    if setup.wen_conditions is not None:
        gen = gen.with_conditions(setup.wen_conditions)
    if not gen.conditions or not getattr(gen, "conditional", True):
        run.update_manifest(wen="skipped: unconditional model")
        return None
    report = wen.wen_report(
        gen, num_seeds=num_seeds, guidance_scale=guidance_scale, seed=seed, show_progress=show_progress
    )
    if extract_run is not None:
        report["extraction"] = wen.compare_with_extraction(report, wen.read_extraction_flags(extract_run))
    atomic_write_json(run.file(WEN_FILE), report)
    return report
