"""``diffaudit loop``: run a self-consuming loop experiment (poisoning then healing) into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from diffaudit.cli.common import err, print_json
from diffaudit.errors import ConfigError

_DIFFUSION_SECTIONS = ("data.", "model.", "train.", "sample.")


def _parse_settings(items: list[str] | None) -> tuple[dict[str, Any], list[str]]:
    """Split ``--set`` items into loop settings (``key=value``) and diffusion overrides (``train.lr=...``)."""
    from diffaudit.config import _parse_value

    settings: dict[str, Any] = {}
    overrides: list[str] = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like key=value (or train.lr=1e-3 for the model)")
        if key.strip().startswith(_DIFFUSION_SECTIONS):
            overrides.append(item)
        else:
            settings[key.strip()] = _parse_value(raw)
    return settings, overrides


def _classes(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    if spec.strip() in ("", "none"):
        return ()
    try:
        return tuple(int(c) for c in spec.split(","))
    except ValueError as exc:
        raise ConfigError(f"--holdout-classes {spec!r} must be comma-separated class indices, e.g. 5,6,7") from exc


def _print_healing(summary: dict[str, Any]) -> None:
    """One line per arm and metric: the healing ratio and how many repeats it averages."""
    for name, data in summary["arms"].items():
        for key, res in data["healing"].items():
            ratio = "undefined" if res["ratio"] is None else f"{res['ratio']:.2f}"
            err.print(f"{name}: healing ratio of {key} over {res['repeats']} repeat(s): {ratio}")


def _names(spec: str | None) -> tuple[str, ...] | None:
    return None if not spec else tuple(a.strip() for a in spec.split(",") if a.strip())


def _sweep_spec(items: list[str], mitigations: str, mitigation_share: float | None):
    """``--sweep FIELD=V1,V2`` items (values parsed as JSON where possible) as a SweepSpec."""
    from diffaudit.config import _parse_value
    from diffaudit.loop.sweep import DEFAULT_SHARES, SweepSpec

    shares: tuple[float, ...] = DEFAULT_SHARES
    axes = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not raw.strip():
            raise ConfigError(f"--sweep {item!r} must look like FIELD=V1,V2 (e.g. guidance_scale=2,7.5)")
        values = tuple(_parse_value(v.strip()) for v in raw.split(","))
        if key.strip() == "synthetic_share":
            try:
                shares = tuple(float(v) for v in values)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"--sweep {item!r}: shares must be numbers") from exc
        else:
            axes.append((key.strip(), values))
    return SweepSpec(
        shares=shares,
        axes=tuple(axes),
        mitigations=tuple(m.strip() for m in mitigations.split(",") if m.strip()),
        mitigation_share=mitigation_share,
    )


def _print_map(doc: dict[str, Any]) -> None:
    """One line per cell: the smallest damaging and collapsing share."""
    for key, cell in doc["cells"].items():
        err.print(
            f"{key}: smallest damaging share {cell['smallest_damaging_share']}, "
            f"smallest collapsing share {cell['smallest_collapsing_share']} (seeds {cell['seeds']})"
        )


def register(app: typer.Typer) -> None:
    @app.command("loop")
    def loop(
        out: Path = typer.Option(..., help="run directory to create (or finish with --resume)"),
        preset: str = typer.Option(
            "nepotism-digits", help="nepotism-digits | bohacek-farid | bohacek-farid-32 | mad-digits | gaussian-digits"
        ),
        quick: bool = typer.Option(False, "--quick", help="a shrunken version that finishes in about a minute"),
        backend: str = typer.Option(None, help="diffusion | gaussian | gmm; default: the preset's"),
        model: str = typer.Option(
            None, "--model", help="a diffusers text-to-image pipeline directory (or sd:PATH) to loop (preset ignored)"
        ),
        data: str = typer.Option(None, "--data", help="with --model: the captioned fine-tuning data (captioned:DIR)"),
        prompts: Path = typer.Option(None, "--prompts", help="with --model: extra prompts without data (held out)"),
        dtype: str = typer.Option("auto", "--dtype", help="with --model: auto | fp32 | fp16 | bf16"),
        mix_source: str = typer.Option(
            None, "--mix-source", help="pool (earlier samples) | img2img (re-render the replaced real images)"
        ),
        strength: float = typer.Option(None, "--strength", help="img2img strength in (0, 1]"),
        mode: str = typer.Option(None, help="replace | accumulate | fresh | fully-synthetic (one arm)"),
        synthetic_share: float = typer.Option(None, help="synthetic fraction of the training set (one arm)"),
        synthetic_count: int = typer.Option(None, help="exact number of synthetic images (one arm)"),
        poison_generations: int = typer.Option(None, min=0),
        heal_generations: int = typer.Option(None, min=0),
        holdout_classes: str = typer.Option(None, help="classes that never get synthetic data, e.g. 5,6,7,8,9"),
        repeats: int = typer.Option(None, min=1, help="independent repeats (seeds seed..seed+R-1)"),
        seed: int = typer.Option(None),
        resume: bool = typer.Option(False, "--resume", help="reuse complete generations, redo incomplete ones"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved arms and exit"),
        set_: list[str] = typer.Option(None, "--set", help="loop setting (base_steps=300) or model override"),
        tag_and_scrub: bool = typer.Option(
            False, "--tag-and-scrub", help="tag every synthetic image and remove detected images before retraining"
        ),
        tag_key: int = typer.Option(1234, help="spread-spectrum key for --tag-and-scrub"),
        tag_amplitude: float = typer.Option(
            3.0, help="tag strength in uint8 levels (8x8 digits need ~48, which is visible: docs/tagging.md)"
        ),
        tag_fpr: float = typer.Option(0.01, help="false-positive rate on real images for the tag threshold"),
        arms: str = typer.Option(None, "--arms", help="keep only these preset arms, e.g. share-0,share-100"),
        with_control: bool = typer.Option(
            False, "--with-control", help="add an arm 'control' (no synthetic data) beside the arm(s) run"
        ),
        sweep: list[str] = typer.Option(
            None,
            "--sweep",
            help="damage map: FIELD=V1,V2 per axis (repeatable); synthetic_share=... gives the shares "
            "(default 0,0.033,0.1,0.25,0.5,1); writes cells/, map.json, map-*.png",
        ),
        mitigations: str = typer.Option(
            "none", "--mitigations", help="with --sweep: none,scrub,accumulate,redifine,self-correct"
        ),
        mitigation_share: float = typer.Option(
            None, "--mitigation-share", help="with --sweep: share of the mitigation arms (default: smallest collapsing)"
        ),
        shard: str = typer.Option(
            None,
            help="run only shard i/n (0-based) of the (arm, repeat) pairs into OUT/shards/, or auto (SLURM array, "
            "Kubernetes JOB_COMPLETION_INDEX + DIFFAUDIT_SHARD_COUNT, RANK/WORLD_SIZE); then: diffaudit merge OUT",
        ),
        shards: int = typer.Option(0, min=0, help="run all of N shards with --engine, then merge (0: no shards)"),
        engine: str = typer.Option("local", help="local (this process) | ray (Ray tasks; needs the ray extra)"),
        address: str = typer.Option(None, help="Ray cluster address (auto, ray://HOST:10001); default: a local one"),
        cpus_per_task: float = typer.Option(1.0, min=0.01, help="with --engine ray: CPUs per shard task"),
    ) -> None:
        """Retrain a model on its own samples for G generations, heal for H, and measure it all."""
        from diffaudit.loop.request import LoopRequest, describe, run_loop, run_loop_sweep

        settings, overrides = _parse_settings(set_)
        request = LoopRequest(
            preset=preset,
            quick=quick,
            model=model,
            data=data,
            prompts=None if prompts is None else str(prompts),
            dtype=dtype,
            backend=backend,
            mode=mode,
            mix_source=mix_source,
            strength=strength,
            synthetic_share=synthetic_share,
            synthetic_count=synthetic_count,
            poison_generations=poison_generations,
            heal_generations=heal_generations,
            holdout_classes=_classes(holdout_classes),
            repeats=repeats,
            seed=seed,
            settings=settings,
            overrides=tuple(overrides),
            arms=_names(arms),
            with_control=with_control,
            tag_and_scrub=tag_and_scrub,
            tag_key=tag_key,
            tag_amplitude=tag_amplitude,
            tag_fpr=tag_fpr,
        )
        request.validate()
        sharded = shard is not None or shards > 0 or engine != "local"
        if sharded and (sweep or dry_run or resume):
            raise ConfigError("--shard/--shards go with a plain loop run (not --sweep, --dry-run or --resume)")
        if sweep:
            spec = _sweep_spec(sweep, mitigations, mitigation_share)
            if dry_run:
                from diffaudit.loop.request import build

                exp = build(request)[0]
                spec.validate(exp.first)
                print_json({"sweep": spec.to_dict(), "base": exp.first.to_dict()})
                return
            _print_map(run_loop_sweep(request, spec, out, resume=resume))
            err.print(f"loop sweep written to {out} (map.json, map-fid.png, map-recall.png, cells/)")
            return
        if dry_run:
            print_json(describe(request))
            return
        if sharded:
            from diffaudit.loop.shards import check_shardable
            from diffaudit.scale.dispatch import ShardOptions, run_sharded
            from diffaudit.scale.engines import loop_stage

            check_shardable(request)
            sharding = ShardOptions(shard, shards, engine, address, cpus_per_task)
            done = run_sharded(loop_stage(), request, out, sharding, resume=resume)
            if done.folder is not None:
                spec = done.spec
                err.print(f"shard {spec.label} in {done.folder}; when all {spec.count} are done: diffaudit merge {out}")
                return
            s = done.summary
            err.print(f"{s['shards']} shards ({s['ran']} run, {s['skipped']} already finished) merged")
            _print_healing(s["summary"])
            err.print(f"loop written to {out} (summary.json, metrics.jsonl, curves.png)")
            return
        summary = run_loop(request, out, resume=resume)
        if "safeguard" in summary:
            threshold = summary["safeguard"]["threshold"]
            err.print(f"tag-and-scrub: threshold {threshold:.4g}; see {out / 'safeguard.json'}")
        _print_healing(summary)
        err.print(f"loop written to {out} (summary.json, metrics.jsonl, curves.png)")

    @app.command("loop-merge")
    def loop_merge(
        runs: list[Path] = typer.Argument(..., help="loop run directories of the same experiment, different seeds"),
        out: Path = typer.Option(..., help="run directory to create for the merged curves and summary"),
    ) -> None:
        """Merge loop runs that differ only in --seed (one per machine, say) into one run with repeat bands.

        Loop sweeps (--sweep) merge too: their cells' seeds are pooled into one map.json."""
        from diffaudit.loop.merge import merge_runs

        if (runs[0] / "config.json").is_file() and '"sweep"' in (runs[0] / "config.json").read_text():
            from diffaudit.loop.sweep import merge_sweeps

            _print_map(merge_sweeps(runs, out))
            err.print(f"merged {len(runs)} sweeps into {out} (map.json, map-*.png)")
            return

        _print_healing(merge_runs(runs, out))
        err.print(f"merged {len(runs)} runs into {out} (summary.json, metrics.jsonl, curves.png)")
